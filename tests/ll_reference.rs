//! The LL CPU reference (src/core/reference.rs) against hand-computed cases and against
//! independent re-statements of docs/LL.md's rules on random worlds.

use ep_core::enums::{ExpertIdKind, Layout};
use ep_reference::ll::*;

const POISON: LlPoison = LlPoison {
    token: 0xDEAD,
    weight: -1234.5,
};

fn bf(x: f32) -> u16 {
    f32_to_bf16_rne(x)
}

// ---- bf16 ------------------------------------------------------------------------------------

#[test]
fn bf16_rounding_is_nearest_even() {
    assert_eq!(bf(1.0), 0x3F80);
    assert_eq!(bf(-1.0), 0xBF80);
    assert_eq!(bf(0.0), 0x0000);
    assert_eq!(bf(-0.0), 0x8000);
    // Exactly halfway: ties go to the even neighbour.
    assert_eq!(f32_to_bf16_rne(f32::from_bits(0x3F80_8000)), 0x3F80);
    assert_eq!(f32_to_bf16_rne(f32::from_bits(0x3F81_8000)), 0x3F82);
    // Past halfway rounds up, below rounds down.
    assert_eq!(f32_to_bf16_rne(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert_eq!(f32_to_bf16_rne(f32::from_bits(0x3F80_7FFF)), 0x3F80);
    // Overflow to infinity, infinity stays.
    assert_eq!(bf(f32::MAX), 0x7F80);
    assert_eq!(bf(f32::INFINITY), 0x7F80);
    assert_eq!(bf(f32::NEG_INFINITY), 0xFF80);
    // 87.75 is halfway between 87.5 and 88: even gives 88 (0x42B0).
    assert_eq!(bf(87.75), 0x42B0);
}

#[test]
fn bf16_nan_stays_nan() {
    for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF] {
        let b = f32_to_bf16_rne(f32::from_bits(bits));
        assert!(bf16_to_f32(b).is_nan(), "{bits:#x} -> {b:#x}");
        assert_eq!(b & 0x8000, ((bits >> 16) as u16) & 0x8000, "sign kept");
    }
}

#[test]
fn bf16_round_trips_every_value() {
    for b in 0..=u16::MAX {
        let f = bf16_to_f32(b);
        if f.is_nan() {
            assert!(bf16_to_f32(f32_to_bf16_rne(f)).is_nan());
        } else {
            assert_eq!(f32_to_bf16_rne(f), b);
        }
    }
}

// ---- the hand-computed world: N=2, E=4 (L=2), B=3, H=8, K=2 ------------------------------------

const H: usize = 8;

/// Token t of rank r holds 100r + 10t + h (all exact in bf16).
fn tok(r: usize, t: usize) -> Vec<u16> {
    (0..H).map(|h| bf((100 * r + 10 * t + h) as f32)).collect()
}

fn tiny() -> LlWorld {
    let shape = LlShape {
        nranks: 2,
        num_experts: 4,
        max_tokens: 3,
        hidden: H,
        topk: 2,
    };
    let rank = |r: usize, topk_idx: Vec<i64>, weights: Vec<f32>| LlRankInput {
        num_tokens: 3,
        tokens: (0..3).flat_map(|t| tok(r, t)).collect(),
        topk_idx,
        weights,
    };
    LlWorld {
        shape,
        ranks: vec![
            rank(0, vec![1, 2, 3, -1, 0, 1], vec![0.5, 0.25, 1.0, 2.0, 0.75, 0.125]),
            // Token 1 names expert 1 twice (it reaches it once); token 2 selects nothing.
            rank(1, vec![2, 3, 1, 1, -1, -1], vec![0.5, 0.5, 0.25, 0.5, 1.0, 1.0]),
        ],
    }
}

fn poison_row() -> Vec<u16> {
    vec![POISON.token; H]
}

/// Row `row` of a [*, H] tensor.
fn row(v: &[u16], row: usize) -> &[u16] {
    &v[row * H..(row + 1) * H]
}

#[test]
fn tiny_route_positions_and_counts() {
    let w = tiny();
    let r = LlRoute::new(&w);
    assert_eq!(r.dests(0, 0), &[(0, 0), (1, 0)]);
    assert_eq!(r.dests(0, 1), &[(1, 1)]);
    assert_eq!(r.dests(0, 2), &[(0, 1)]);
    assert_eq!(r.dests(1, 1), &[(0, 0)]);
    assert!(r.dests(1, 2).is_empty());
    assert_eq!((r.sent(0, 0), r.sent(0, 1), r.sent(1, 0), r.sent(1, 1)), (2, 2, 1, 1));
    assert_eq!((r.pos(0, 0, 0), r.pos(0, 2, 1), r.pos(0, 1, 1)), (0, 1, -1));
    // The duplicate shares its first occurrence's pos and counts once.
    assert_eq!((r.pos(1, 1, 0), r.pos(1, 1, 1)), (0, 0));
    assert_eq!(r.expert_count(0, 1, 1), 1);
    assert_eq!(r.expert_count(0, 0, 1), 2);
    assert_eq!((r.em_first_k(1, 1, 0), r.em_first_k(1, 1, 1)), (Some(0), Some(0)));
    assert_eq!((r.em_first_k(0, 0, 1), r.em_first_k(0, 1, 1)), (Some(1), None));
    // base of expert 1 on rank 0 for source 1 is 2: both occurrences name row 2.
    assert_eq!(r.em_row(&w, 1, 1, 0), Some((0, 1, 2)));
    assert_eq!(r.em_row(&w, 1, 1, 1), Some((0, 1, 2)));
}

#[test]
fn tiny_expert_major_dispatch() {
    let out = ll_dispatch_ref(&tiny(), Layout::ExpertMajor, ExpertIdKind::Local, POISON);
    let nb = 6; // N·B rows per expert
    let LlDispatchOut::ExpertMajor {
        tokens,
        expert_counters,
    } = &out[0]
    else {
        panic!()
    };
    assert_eq!(expert_counters, &[1, 3], "the duplicate counts once");
    assert_eq!(row(tokens, 0), tok(0, 2));
    let e1 = [tok(0, 0), tok(0, 2), tok(1, 1)];
    for (i, t) in e1.iter().enumerate() {
        assert_eq!(row(tokens, nb + i), t.as_slice(), "expert 1 row {i}");
    }
    for r in (1..nb).chain(nb + 3..2 * nb) {
        assert_eq!(row(tokens, r), poison_row(), "row {r} untouched");
    }
    let LlDispatchOut::ExpertMajor {
        tokens,
        expert_counters,
    } = &out[1]
    else {
        panic!()
    };
    assert_eq!(expert_counters, &[2, 2]);
    assert_eq!(row(tokens, 0), tok(0, 0));
    assert_eq!(row(tokens, 1), tok(1, 0));
    assert_eq!(row(tokens, nb), tok(0, 1));
    assert_eq!(row(tokens, nb + 1), tok(1, 0));
}

#[test]
fn tiny_rank_major_dispatch() {
    let w = tiny();
    let out = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Local, POISON);
    let LlDispatchOut::RankMajor {
        tokens,
        topk_idx,
        topk_weights,
        src_rank_counters,
    } = &out[0]
    else {
        panic!()
    };
    assert_eq!(src_rank_counters, &[2, 1]);
    assert_eq!(row(tokens, 0), tok(0, 0));
    assert_eq!(row(tokens, 1), tok(0, 2));
    assert_eq!(row(tokens, 2), poison_row());
    assert_eq!(row(tokens, 3), tok(1, 1));
    assert_eq!(row(tokens, 4), poison_row());
    assert_eq!(topk_idx, &[1, -1, 0, 1, -1, -1, 1, 1, -1, -1, -1, -1]);
    let p = POISON.weight;
    assert_eq!(topk_weights, &[0.5, 0.25, 0.75, 0.125, p, p, 0.25, 0.5, p, p, p, p]);

    let LlDispatchOut::RankMajor {
        tokens,
        topk_idx,
        src_rank_counters,
        ..
    } = &out[1]
    else {
        panic!()
    };
    assert_eq!(src_rank_counters, &[2, 1]);
    assert_eq!(row(tokens, 0), tok(0, 0));
    assert_eq!(row(tokens, 1), tok(0, 1));
    assert_eq!(row(tokens, 3), tok(1, 0));
    assert_eq!(topk_idx, &[-1, 0, 1, -1, -1, -1, 0, 1, -1, -1, -1, -1]);

    let global = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Global, POISON);
    let LlDispatchOut::RankMajor { topk_idx, .. } = &global[1] else {
        panic!()
    };
    assert_eq!(topk_idx, &[-1, 2, 3, -1, -1, -1, 2, 3, -1, -1, -1, -1]);
}

/// bf16(c · v) for every element of token (r, t).
fn scaled(r: usize, t: usize, c: f32) -> Vec<u16> {
    tok(r, t).iter().map(|&v| bf(c * bf16_to_f32(v))).collect()
}

#[test]
fn tiny_combine_both_layouts() {
    let w = tiny();
    let em = ll_dispatch_ref(&w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
    let x: Vec<Vec<u16>> = em.iter().map(|o| o.tokens().to_vec()).collect();
    let weights: Vec<Vec<f32>> = w.ranks.iter().map(|r| r.weights.clone()).collect();
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    assert_eq!(row(&out[0], 0), scaled(0, 0, 0.75));
    assert_eq!(row(&out[0], 1), tok(0, 1));
    assert_eq!(row(&out[0], 2), scaled(0, 2, 0.875));
    assert_eq!(row(&out[1], 0), tok(1, 0));
    assert_eq!(row(&out[1], 1), scaled(1, 1, 0.75), "both weights on the one row");
    assert_eq!(row(&out[1], 1)[7], 0x42B0, "0.75 * 117 = 87.75 rounds to even 88");
    assert_eq!(row(&out[1], 2), vec![0u16; H], "no expert gives 0");

    let rm = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Local, POISON);
    let y: Vec<Vec<u16>> = rm.iter().map(|o| o.tokens().to_vec()).collect();
    let out = ll_combine_ref(&w, LlCombineIn::RankMajor { y: &y });
    assert_eq!(row(&out[0], 0), scaled(0, 0, 2.0), "two destination ranks");
    assert_eq!(row(&out[0], 1), tok(0, 1));
    assert_eq!(row(&out[0], 2), tok(0, 2), "two experts on one rank count once");
    assert_eq!(row(&out[1], 0), tok(1, 0));
    assert_eq!(row(&out[1], 1), tok(1, 1), "a duplicated expert counts once");
    assert_eq!(row(&out[1], 2), vec![0u16; H]);
}

// ---- duplicate experts in one top-k row: N=2, E=4 (L=2), B=2, H=8, K=3 -------------------------

/// Rank 0: token 0 names expert 1 at k=0 and k=2 around expert 0 (all on rank 0); token 1 names
/// expert 3 three times. Rank 1: token 0 names expert 2 at k=0 and k=2 around a −1; token 1
/// names expert 1 at k=0 and k=2 around expert 3 (two destination ranks).
fn dups() -> LlWorld {
    let shape = LlShape {
        nranks: 2,
        num_experts: 4,
        max_tokens: 2,
        hidden: H,
        topk: 3,
    };
    let rank = |r: usize, topk_idx: Vec<i64>, weights: Vec<f32>| LlRankInput {
        num_tokens: 2,
        tokens: (0..2).flat_map(|t| tok(r, t)).collect(),
        topk_idx,
        weights,
    };
    LlWorld {
        shape,
        ranks: vec![
            rank(0, vec![1, 0, 1, 3, 3, 3], vec![0.5, 0.25, 2.0, 0.125, 0.25, 0.5]),
            rank(1, vec![2, -1, 2, 1, 3, 1], vec![1.0, 1.0, 0.75, 0.5, 1.0, 0.25]),
        ],
    }
}

#[test]
fn dups_route() {
    let w = dups();
    let r = LlRoute::new(&w);
    assert_eq!(r.dests(0, 0), &[(0, 0)]);
    assert_eq!(r.dests(0, 1), &[(1, 0)]);
    assert_eq!(r.dests(1, 0), &[(1, 0)]);
    assert_eq!(r.dests(1, 1), &[(0, 0), (1, 1)]);
    assert_eq!((r.sent(0, 0), r.sent(0, 1), r.sent(1, 0), r.sent(1, 1)), (1, 1, 1, 2));
    // One pair per (token, expert): every count is 0 or 1 here.
    assert_eq!((r.expert_count(0, 0, 0), r.expert_count(0, 0, 1)), (1, 1));
    assert_eq!((r.expert_count(1, 0, 0), r.expert_count(1, 0, 1)), (0, 1));
    assert_eq!((r.expert_count(0, 1, 0), r.expert_count(0, 1, 1)), (0, 1));
    assert_eq!((r.expert_count(1, 1, 0), r.expert_count(1, 1, 1)), (1, 1));
    for (s, t) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        for k in 0..3 {
            let want_pos = if (s, t, k) == (1, 0, 1) { -1 } else { 0 };
            assert_eq!(r.pos(s, t, k), want_pos, "pos({s}, {t}, {k})");
        }
    }
    let firsts: Vec<Option<usize>> = [(0, 0), (0, 1), (1, 0), (1, 1)]
        .iter()
        .flat_map(|&(s, t)| (0..3).map(move |k| (s, t, k)))
        .map(|(s, t, k)| r.em_first_k(s, t, k))
        .collect();
    let (z, o) = (Some(0), Some(1));
    assert_eq!(firsts, [z, o, z, z, z, z, z, None, z, z, o, z]);
    // Every occurrence names the first one's row.
    assert_eq!(r.em_row(&w, 0, 0, 0), Some((0, 1, 0)));
    assert_eq!(r.em_row(&w, 0, 0, 2), Some((0, 1, 0)));
    assert_eq!(r.em_row(&w, 0, 1, 2), Some((1, 1, 0)));
    assert_eq!(r.em_row(&w, 1, 0, 2), Some((1, 0, 0)));
    assert_eq!(r.em_row(&w, 1, 1, 2), Some((0, 1, 1)));
    assert_eq!(r.em_row(&w, 1, 1, 1), Some((1, 1, 1)));
    assert_eq!(r.em_row(&w, 1, 0, 1), None);
}

#[test]
fn dups_expert_major_dispatch() {
    let out = ll_dispatch_ref(&dups(), Layout::ExpertMajor, ExpertIdKind::Local, POISON);
    let nb = 4;
    // [rank][expert] -> rows in order; the rest of the N·B rows stay poison.
    let want: [[Vec<Vec<u16>>; 2]; 2] = [
        [vec![tok(0, 0)], vec![tok(0, 0), tok(1, 1)]],
        [vec![tok(1, 0)], vec![tok(0, 1), tok(1, 1)]],
    ];
    for (d, o) in out.iter().enumerate() {
        let LlDispatchOut::ExpertMajor {
            tokens,
            expert_counters,
        } = o
        else {
            panic!()
        };
        let counts: Vec<i32> = want[d].iter().map(|v| v.len() as i32).collect();
        assert_eq!(expert_counters, &counts, "rank {d}: one row per (token, expert)");
        for (le, rows) in want[d].iter().enumerate() {
            for i in 0..nb {
                let got = row(tokens, le * nb + i);
                match rows.get(i) {
                    Some(t) => assert_eq!(got, t.as_slice(), "rank {d} expert {le} row {i}"),
                    None => assert_eq!(got, poison_row(), "rank {d} expert {le} row {i} untouched"),
                }
            }
        }
    }
}

#[test]
fn dups_rank_major_dispatch() {
    let w = dups();
    let p = POISON.weight;
    let out = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Local, POISON);
    let LlDispatchOut::RankMajor {
        tokens,
        topk_idx,
        topk_weights,
        src_rank_counters,
    } = &out[0]
    else {
        panic!()
    };
    assert_eq!(src_rank_counters, &[1, 1]);
    assert_eq!(row(tokens, 0), tok(0, 0));
    assert_eq!(row(tokens, 1), poison_row());
    assert_eq!(row(tokens, 2), tok(1, 1));
    assert_eq!(row(tokens, 3), poison_row());
    // Every occurrence is listed.
    assert_eq!(topk_idx, &[1, 0, 1, -1, -1, -1, 1, -1, 1, -1, -1, -1]);
    assert_eq!(topk_weights, &[0.5, 0.25, 2.0, p, p, p, 0.5, 1.0, 0.25, p, p, p]);

    let LlDispatchOut::RankMajor {
        tokens,
        topk_idx,
        topk_weights,
        src_rank_counters,
    } = &out[1]
    else {
        panic!()
    };
    assert_eq!(src_rank_counters, &[1, 2]);
    assert_eq!(row(tokens, 0), tok(0, 1));
    assert_eq!(row(tokens, 1), poison_row());
    assert_eq!(row(tokens, 2), tok(1, 0));
    assert_eq!(row(tokens, 3), tok(1, 1));
    assert_eq!(topk_idx, &[1, 1, 1, -1, -1, -1, 0, -1, 0, -1, 1, -1]);
    assert_eq!(
        topk_weights,
        &[0.125, 0.25, 0.5, p, p, p, 1.0, 1.0, 0.75, 0.5, 1.0, 0.25]
    );

    let global = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Global, POISON);
    let LlDispatchOut::RankMajor { topk_idx, .. } = &global[1] else {
        panic!()
    };
    assert_eq!(topk_idx, &[3, 3, 3, -1, -1, -1, 2, -1, 2, -1, 3, -1]);
}

/// A [rows, H] tensor of poison with row i set to the constant `vals[i].1` where given.
fn const_rows(rows: usize, vals: &[(usize, f32)]) -> Vec<u16> {
    let mut v = vec![POISON.token; rows * H];
    for &(r, x) in vals {
        v[r * H..(r + 1) * H].fill(bf(x));
    }
    v
}

#[test]
fn dups_combine_both_layouts() {
    let w = dups();
    // Expert outputs: a different constant per (rank, expert, row); unused rows stay poison
    // (-6.1e18 in bf16), so reading one would show. Rows are [l·N·B + r].
    let x = vec![
        const_rows(8, &[(0, 1.0), (4, 2.0), (5, 4.0)]),
        const_rows(8, &[(0, 8.0), (4, 16.0), (5, 32.0)]),
    ];
    let weights: Vec<Vec<f32>> = w.ranks.iter().map(|r| r.weights.clone()).collect();
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    let c = |v: f32| vec![bf(v); H];
    // Rank 0, token 0: 0.5·x[e1] + 0.25·x[e0] + 2·x[e1] = 1 + 0.25 + 4.
    assert_eq!(row(&out[0], 0), c(5.25));
    // Rank 0, token 1: (0.125 + 0.25 + 0.5)·16.
    assert_eq!(row(&out[0], 1), c(14.0));
    // Rank 1, token 0: (1 + 0.75)·8 (the −1 in between adds nothing).
    assert_eq!(row(&out[1], 0), c(14.0));
    // Rank 1, token 1: 0.5·4 + 1·32 + 0.25·4.
    assert_eq!(row(&out[1], 1), c(35.0));

    // Rank-major: y_d[s][slot] (pre-reduced), one term per distinct destination rank.
    let y = vec![
        const_rows(4, &[(0, 1.0), (2, 2.0)]),
        const_rows(4, &[(0, 4.0), (2, 8.0), (3, 16.0)]),
    ];
    let out = ll_combine_ref(&w, LlCombineIn::RankMajor { y: &y });
    assert_eq!(row(&out[0], 0), c(1.0), "three selections, one rank");
    assert_eq!(row(&out[0], 1), c(4.0));
    assert_eq!(row(&out[1], 0), c(8.0));
    assert_eq!(row(&out[1], 1), c(2.0 + 16.0), "two ranks, each once");

    // Identity experts on the dispatched rows: every occurrence adds its weight to one row.
    let em = ll_dispatch_ref(&w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
    let x: Vec<Vec<u16>> = em.iter().map(|o| o.tokens().to_vec()).collect();
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    assert_eq!(row(&out[0], 0), scaled(0, 0, 2.75));
    assert_eq!(row(&out[0], 1), scaled(0, 1, 0.875));
    assert_eq!(row(&out[1], 0), scaled(1, 0, 1.75));
    assert_eq!(row(&out[1], 1), scaled(1, 1, 1.75));
}

/// The duplicate's weight is added at its own k, reading the first occurrence's row: with
/// x[e1] = 1 at k=0 and k=2 around x[e0] = −1 at k=1, (1 − 1) + 2^-24 gives 2^-24, while moving
/// the duplicate next to its first occurrence, (1 + 2^-24) − 1, would give 0.
#[test]
fn duplicate_weight_adds_at_its_own_k() {
    let world = LlWorld {
        shape: LlShape {
            nranks: 1,
            num_experts: 2,
            max_tokens: 1,
            hidden: 1,
            topk: 3,
        },
        ranks: vec![LlRankInput {
            num_tokens: 1,
            tokens: vec![0],
            topk_idx: vec![1, 0, 1],
            weights: vec![0.0; 3],
        }],
    };
    // x [L=2, N·B=1, H=1]: expert 0 row 0, expert 1 row 0.
    let x = vec![vec![bf(-1.0), bf(1.0)]];
    let tiny = 2f32.powi(-24);
    let weights = vec![vec![1.0, 1.0, tiny]];
    let out = ll_combine_ref(
        &world,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    assert_eq!(out[0], vec![bf(tiny)]);
    assert_eq!(bf((1.0 + tiny) - 1.0), bf(0.0), "regrouped differs");
}

/// Every token of every rank names one expert K times: it gets exactly N·B rows (K·N·B
/// selections), its counter says N·B, and the others stay empty.
#[test]
fn heavy_duplication_stays_within_n_times_b() {
    let shape = LlShape {
        nranks: 3,
        num_experts: 6,
        max_tokens: 4,
        hidden: H,
        topk: 5,
    };
    let (n, b, k) = (shape.nranks, shape.max_tokens, shape.topk);
    let ranks = (0..n)
        .map(|r| LlRankInput {
            num_tokens: b,
            tokens: (0..b).flat_map(|t| tok(r, t)).collect(),
            topk_idx: (0..b)
                .flat_map(|t| (0..k).map(move |kk| if t == 1 && kk == 3 { -1 } else { 3 }))
                .collect(),
            weights: (0..b * k).map(|i| 0.125 * (i % 4) as f32).collect(),
        })
        .collect();
    let w = LlWorld { shape, ranks };
    let em = ll_dispatch_ref(&w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
    let nb = n * b;
    for (d, o) in em.iter().enumerate() {
        let LlDispatchOut::ExpertMajor {
            tokens,
            expert_counters,
        } = o
        else {
            panic!()
        };
        // Expert 3 is rank 1's local expert 1.
        let want = if d == 1 { vec![0, nb as i32] } else { vec![0, 0] };
        assert_eq!(expert_counters, &want, "rank {d}");
        if d == 1 {
            for (i, (s, t)) in (0..n).flat_map(|s| (0..b).map(move |t| (s, t))).enumerate() {
                assert_eq!(row(tokens, nb + i), tok(s, t), "row {i}");
            }
            assert!(row(tokens, 0).iter().all(|&v| v == POISON.token));
        }
    }
    let rm = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Global, POISON);
    let LlDispatchOut::RankMajor {
        topk_idx,
        src_rank_counters,
        ..
    } = &rm[1]
    else {
        panic!()
    };
    assert_eq!(src_rank_counters, &vec![b as i32; n]);
    assert_eq!(&topk_idx[..k], &[3; 5]);
    assert_eq!(&topk_idx[k..2 * k], &[3, 3, 3, -1, 3]);
    // Identity experts: Σ_k w·x over every occurrence.
    let x: Vec<Vec<u16>> = em.iter().map(|o| o.tokens().to_vec()).collect();
    let weights: Vec<Vec<f32>> = w.ranks.iter().map(|r| r.weights.clone()).collect();
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    for s in 0..n {
        for t in 0..b {
            let sum: f32 = (0..k)
                .filter(|&kk| w.ranks[s].topk_idx[t * k + kk] >= 0)
                .map(|kk| weights[s][t * k + kk])
                .sum();
            assert_eq!(row(&out[s], t), scaled(s, t, sum), "rank {s} token {t}");
        }
    }
}

/// Expert-major combine fuses each multiply into the add and goes in increasing k: here
/// 1·(−1) + w·1.0078125 rounds to 0xB64A fused, but to 0xB648 with a rounded product (or with
/// the terms the other way round).
#[test]
fn expert_major_combine_uses_fma_in_k_order() {
    let w1 = f32::from_bits(0x3F7E_03C6);
    let world = LlWorld {
        shape: LlShape {
            nranks: 1,
            num_experts: 2,
            max_tokens: 1,
            hidden: 1,
            topk: 2,
        },
        ranks: vec![LlRankInput {
            num_tokens: 1,
            tokens: vec![0],
            topk_idx: vec![0, 1],
            weights: vec![0.0, 0.0],
        }],
    };
    let x = vec![vec![bf(-1.0), bf(1.0078125)]];
    let weights = vec![vec![1.0, w1]];
    let out = ll_combine_ref(
        &world,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &weights,
        },
    );
    assert_eq!(out[0], vec![0xB64A]);
    assert_eq!(bf(w1 * 1.0078125 - 1.0), 0xB648, "unfused differs");
}

/// Rank-major combine adds the destination ranks in first-appearance order: (1 + 2^-24) − 1 is
/// 0 in f32, while rank order (−1 + 2^-24) + 1 would give 2^-24.
#[test]
fn rank_major_combine_adds_in_first_appearance_order() {
    let world = LlWorld {
        shape: LlShape {
            nranks: 3,
            num_experts: 3,
            max_tokens: 1,
            hidden: 1,
            topk: 3,
        },
        ranks: vec![
            LlRankInput {
                num_tokens: 1,
                tokens: vec![0],
                topk_idx: vec![2, 1, 0],
                weights: vec![0.0; 3],
            },
            LlRankInput {
                num_tokens: 0,
                tokens: vec![],
                topk_idx: vec![],
                weights: vec![],
            },
            LlRankInput {
                num_tokens: 0,
                tokens: vec![],
                topk_idx: vec![],
                weights: vec![],
            },
        ],
    };
    // y_d [N, B, H]: only row [0][0] (rank 0's token) is read.
    let tiny = 2f32.powi(-24);
    let y: Vec<Vec<u16>> = [-1.0, tiny, 1.0].iter().map(|&v| vec![bf(v), 0, 0]).collect();
    let out = ll_combine_ref(&world, LlCombineIn::RankMajor { y: &y });
    assert_eq!(out[0], vec![0x0000]);
    assert_eq!(bf((-1.0 + tiny) + 1.0), bf(tiny), "rank order differs");
    assert!(out[1].is_empty() && out[2].is_empty());
}

// ---- random worlds -----------------------------------------------------------------------------

fn shapes() -> Vec<LlShape> {
    let s = |nranks, num_experts, max_tokens, hidden, topk| LlShape {
        nranks,
        num_experts,
        max_tokens,
        hidden,
        topk,
    };
    vec![
        s(1, 4, 5, 8, 2),
        s(2, 4, 3, 8, 2),
        s(3, 12, 7, 16, 4),
        s(4, 16, 9, 8, 8),
        s(4, 8, 6, 8, 5),
    ]
}

fn routings(n: usize) -> Vec<Routing> {
    vec![Routing::Uniform, Routing::Skewed { rank: n - 1 }, Routing::SameRankDups]
}

/// A world whose rows draw every position from two experts (or −1, one in eight): most rows
/// name an expert several times, and one expert is named far more than N·B times in all.
fn heavy_dups(rng: &mut SplitMix64, shape: LlShape) -> LlWorld {
    let mut w = LlWorld::random(rng, shape, Routing::Uniform);
    let pool = [rng.below(shape.num_experts) as i64, rng.below(shape.num_experts) as i64];
    for r in &mut w.ranks {
        for e in &mut r.topk_idx {
            *e = if rng.one_in(8) { -1 } else { pool[rng.below(2)] };
        }
    }
    w.check();
    w
}

/// Calls f on a spread of random worlds, heavily duplicated ones included.
fn for_worlds(mut f: impl FnMut(&LlWorld)) {
    for (i, shape) in shapes().into_iter().enumerate() {
        for routing in routings(shape.nranks) {
            for seed in 0..6u64 {
                let mut rng = SplitMix64::new(seed * 1000 + i as u64);
                f(&LlWorld::random(&mut rng, shape, routing));
            }
        }
        for seed in 0..6u64 {
            let mut rng = SplitMix64::new(seed * 1000 + 500 + i as u64);
            f(&heavy_dups(&mut rng, shape));
        }
    }
}

fn tok_of(w: &LlWorld, s: usize, t: usize) -> &[u16] {
    let h = w.shape.hidden;
    &w.ranks[s].tokens[t * h..(t + 1) * h]
}

/// The distinct valid expert ids of row t of rank s, in first-occurrence order.
fn distinct_experts(w: &LlWorld, s: usize, t: usize) -> Vec<i64> {
    let k = w.shape.topk;
    let mut v: Vec<i64> = Vec::new();
    for &e in &w.ranks[s].topk_idx[t * k..(t + 1) * k] {
        if e >= 0 && !v.contains(&e) {
            v.push(e);
        }
    }
    v
}

#[test]
fn counters_count_distinct_pairs() {
    for_worlds(|w| {
        let sh = w.shape;
        let em = ll_dispatch_ref(w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
        let rm = ll_dispatch_ref(w, Layout::RankMajor, ExpertIdKind::Local, POISON);
        let route = LlRoute::new(w);
        // Distinct (token, expert) pairs, per source and expert.
        let mut pairs_of = vec![vec![0usize; sh.num_experts]; sh.nranks];
        for (s, r) in w.ranks.iter().enumerate() {
            for t in 0..r.num_tokens {
                for e in distinct_experts(w, s, t) {
                    pairs_of[s][e as usize] += 1;
                }
            }
        }
        let l = sh.local_experts();
        for d in 0..sh.nranks {
            for (s, pairs) in pairs_of.iter().enumerate() {
                for le in 0..l {
                    assert_eq!(
                        route.expert_count(d, s, le),
                        pairs[d * l + le],
                        "expert_count[{s}][{le}] at {d}"
                    );
                }
            }
        }
        for (d, o) in em.iter().enumerate() {
            let LlDispatchOut::ExpertMajor { expert_counters, .. } = o else {
                unreachable!()
            };
            for le in 0..l {
                let want: usize = (0..sh.nranks).map(|s| pairs_of[s][d * l + le]).sum();
                assert_eq!(expert_counters[le] as usize, want, "rank {d} expert {le}");
                assert!(want <= sh.nranks * sh.max_tokens, "an expert gets at most N*B rows");
            }
        }
        // pos: earlier tokens of the source that selected the expert, the same at every
        // occurrence in a row; em_first_k: the first position naming the same id.
        for (s, r) in w.ranks.iter().enumerate() {
            let mut seen = vec![0i64; sh.num_experts];
            for t in 0..r.num_tokens {
                let ids = &r.topk_idx[t * sh.topk..(t + 1) * sh.topk];
                for (kk, &e) in ids.iter().enumerate() {
                    if e < 0 {
                        assert_eq!((route.pos(s, t, kk), route.em_first_k(s, t, kk)), (-1, None));
                    } else {
                        assert_eq!(route.pos(s, t, kk), seen[e as usize], "pos of ({s}, {t}, {kk})");
                        assert_eq!(route.em_first_k(s, t, kk), ids.iter().position(|&x| x == e));
                    }
                }
                for e in distinct_experts(w, s, t) {
                    seen[e as usize] += 1;
                }
            }
        }
        // Each token counts once per distinct destination rank.
        let mut pairs = 0;
        for r in &w.ranks {
            for t in 0..r.num_tokens {
                let mut ranks: Vec<i64> = r.topk_idx[t * sh.topk..(t + 1) * sh.topk]
                    .iter()
                    .filter(|&&e| e >= 0)
                    .map(|&e| e / sh.local_experts() as i64)
                    .collect();
                ranks.sort();
                ranks.dedup();
                pairs += ranks.len();
            }
        }
        let rm_rows: i32 = rm
            .iter()
            .map(|o| match o {
                LlDispatchOut::RankMajor { src_rank_counters, .. } => src_rank_counters.iter().sum::<i32>(),
                _ => unreachable!(),
            })
            .sum();
        assert_eq!(rm_rows as usize, pairs);
    });
}

/// Expert-major rows follow (source rank, token) order, one row per distinct (token, expert)
/// pair: re-derived by a plain scan.
#[test]
fn expert_major_rows_in_source_then_token_order() {
    for_worlds(|w| {
        let sh = w.shape;
        let (n, l, h, k) = (sh.nranks, sh.local_experts(), sh.hidden, sh.topk);
        let nb = n * sh.max_tokens;
        let em = ll_dispatch_ref(w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
        for (d, out) in em.iter().enumerate() {
            let LlDispatchOut::ExpertMajor {
                tokens,
                expert_counters,
            } = out
            else {
                panic!()
            };
            for le in 0..l {
                let e = (d * l + le) as i64;
                let want: Vec<&[u16]> = (0..n)
                    .flat_map(|s| (0..w.ranks[s].num_tokens).map(move |t| (s, t)))
                    .filter(|&(s, t)| w.ranks[s].topk_idx[t * k..(t + 1) * k].contains(&e))
                    .map(|(s, t)| tok_of(w, s, t))
                    .collect();
                assert_eq!(expert_counters[le] as usize, want.len());
                assert!(want.len() <= nb, "at most N*B rows per expert");
                for r in 0..nb {
                    let got = &tokens[(le * nb + r) * h..][..h];
                    match want.get(r) {
                        Some(x) => assert_eq!(got, *x, "rank {d} expert {le} row {r}"),
                        None => assert!(got.iter().all(|&v| v == POISON.token), "row {r} untouched"),
                    }
                }
            }
        }
    });
}

/// Rank-major rows walked in (source, slot, first occurrence of each local id) order rebuild
/// the expert-major rows exactly.
#[test]
fn rank_major_and_expert_major_agree() {
    for_worlds(|w| {
        let sh = w.shape;
        let (n, b, l, h, k) = (sh.nranks, sh.max_tokens, sh.local_experts(), sh.hidden, sh.topk);
        let em = ll_dispatch_ref(w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
        let rm = ll_dispatch_ref(w, Layout::RankMajor, ExpertIdKind::Local, POISON);
        let rg = ll_dispatch_ref(w, Layout::RankMajor, ExpertIdKind::Global, POISON);
        for d in 0..n {
            let LlDispatchOut::ExpertMajor {
                tokens: et,
                expert_counters,
            } = &em[d]
            else {
                panic!()
            };
            let LlDispatchOut::RankMajor {
                tokens,
                topk_idx,
                topk_weights,
                src_rank_counters,
            } = &rm[d]
            else {
                panic!()
            };
            let LlDispatchOut::RankMajor { topk_idx: gidx, .. } = &rg[d] else {
                panic!()
            };
            let mut per_expert: Vec<Vec<&[u16]>> = vec![Vec::new(); l];
            for (s, &ns) in src_rank_counters.iter().enumerate() {
                let ns = ns as usize;
                for i in 0..b {
                    let r = s * b + i;
                    let data = &tokens[r * h..][..h];
                    let (ids, ws) = (&topk_idx[r * k..][..k], &topk_weights[r * k..][..k]);
                    if i >= ns {
                        assert!(data.iter().all(|&v| v == POISON.token), "stale row written");
                        assert!(ids.iter().all(|&e| e == -1), "stale ids reset");
                        assert!(ws.iter().all(|&x| x.to_bits() == POISON.weight.to_bits()));
                        continue;
                    }
                    assert!(ids.iter().any(|&e| e >= 0), "a received row has a local expert");
                    for kk in 0..k {
                        let e = ids[kk];
                        assert_eq!(gidx[r * k + kk], if e < 0 { -1 } else { e + (d * l) as i32 });
                        if e >= 0 && !ids[..kk].contains(&e) {
                            per_expert[e as usize].push(data);
                        }
                    }
                }
            }
            let nb = n * b;
            for (le, rows) in per_expert.iter().enumerate() {
                assert_eq!(rows.len(), expert_counters[le] as usize);
                for (r, data) in rows.iter().enumerate() {
                    assert_eq!(&et[(le * nb + r) * h..][..h], *data);
                }
            }
        }
        // Received rank-major rows carry their source token, all K weights and every local
        // occurrence of an id (duplicates included), in token order.
        let route = LlRoute::new(w);
        for (s, inp) in w.ranks.iter().enumerate() {
            for t in 0..inp.num_tokens {
                for &(d, i) in route.dests(s, t) {
                    let LlDispatchOut::RankMajor {
                        tokens,
                        topk_idx,
                        topk_weights,
                        ..
                    } = &rm[d]
                    else {
                        panic!()
                    };
                    let r = s * b + i;
                    assert_eq!(&tokens[r * h..][..h], tok_of(w, s, t));
                    assert_eq!(&topk_weights[r * k..][..k], &inp.weights[t * k..][..k]);
                    for kk in 0..k {
                        let e = inp.topk_idx[t * k + kk];
                        let want = if e >= 0 && e as usize / l == d {
                            e as i32 - (d * l) as i32
                        } else {
                            -1
                        };
                        assert_eq!(topk_idx[r * k + kk], want);
                    }
                }
            }
        }
    });
}

/// Dispatch, identity experts, combine: EM gives Σ_k w·x over every valid k, duplicates
/// included (fma in increasing k), RM gives x times the number of distinct destination ranks
/// (sequential adds).
#[test]
fn round_trips() {
    for_worlds(|w| {
        let sh = w.shape;
        let (h, k, l) = (sh.hidden, sh.topk, sh.local_experts());
        let em = ll_dispatch_ref(w, Layout::ExpertMajor, ExpertIdKind::Local, POISON);
        let x: Vec<Vec<u16>> = em.iter().map(|o| o.tokens().to_vec()).collect();
        // Combine weights differ from the dispatched ones on purpose.
        let cw: Vec<Vec<f32>> = w
            .ranks
            .iter()
            .map(|r| r.weights.iter().map(|v| 1.0 - v).collect())
            .collect();
        let out_em = ll_combine_ref(w, LlCombineIn::ExpertMajor { x: &x, weights: &cw });
        let rm = ll_dispatch_ref(w, Layout::RankMajor, ExpertIdKind::Local, POISON);
        let y: Vec<Vec<u16>> = rm.iter().map(|o| o.tokens().to_vec()).collect();
        let out_rm = ll_combine_ref(w, LlCombineIn::RankMajor { y: &y });
        for (s, inp) in w.ranks.iter().enumerate() {
            assert_eq!(out_em[s].len(), inp.num_tokens * h);
            for t in 0..inp.num_tokens {
                let ids = &inp.topk_idx[t * k..][..k];
                let mut ranks: Vec<i64> = Vec::new();
                for &e in ids.iter().filter(|&&e| e >= 0) {
                    if !ranks.contains(&(e / l as i64)) {
                        ranks.push(e / l as i64);
                    }
                }
                for (j, &v) in tok_of(w, s, t).iter().enumerate() {
                    let v = bf16_to_f32(v);
                    let mut acc = 0f32;
                    for kk in (0..k).filter(|&kk| ids[kk] >= 0) {
                        acc = cw[s][t * k + kk].mul_add(v, acc);
                    }
                    assert_eq!(out_em[s][t * h + j], bf(acc), "EM rank {s} token {t} elem {j}");
                    let mut acc = 0f32;
                    for _ in &ranks {
                        acc += v;
                    }
                    assert_eq!(out_rm[s][t * h + j], bf(acc), "RM rank {s} token {t} elem {j}");
                }
            }
        }
    });
}

// ---- generators --------------------------------------------------------------------------------

#[test]
fn generators_have_their_properties() {
    let shape = LlShape {
        nranks: 4,
        num_experts: 16,
        max_tokens: 64,
        hidden: 8,
        topk: 6,
    };
    let (k, l) = (shape.topk, shape.local_experts());
    let mut rng = SplitMix64::new(7);
    let mut nones = 0;
    for _ in 0..4 {
        let t = 40;
        let uni = gen_routing(&mut rng, shape, t, Routing::Uniform);
        let skew = gen_routing(&mut rng, shape, t, Routing::Skewed { rank: 2 });
        let dups = gen_routing(&mut rng, shape, t, Routing::SameRankDups);
        let (mut dup_tokens, mut triple_tokens, mut same_rank_tokens) = (0, 0, 0);
        for tok in 0..t {
            let row = |v: &[i64]| v[tok * k..(tok + 1) * k].to_vec();
            let mut u: Vec<i64> = row(&uni).into_iter().filter(|&e| e >= 0).collect();
            nones += k - u.len();
            let before = u.len();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), before, "uniform: distinct experts");
            assert!(row(&skew).iter().all(|&e| e == -1 || (e as usize) / l == 2));
            let d: Vec<i64> = row(&dups).into_iter().filter(|&e| e >= 0).collect();
            let most = d
                .iter()
                .map(|e| d.iter().filter(|&x| x == e).count())
                .max()
                .unwrap_or(0);
            dup_tokens += (most >= 2) as usize;
            triple_tokens += (most >= 3) as usize;
            let mut dd = d.clone();
            dd.sort();
            dd.dedup();
            let on_rank = |r: i64| dd.iter().filter(|&&e| e / l as i64 == r).count();
            same_rank_tokens += (0..shape.nranks as i64).any(|r| on_rank(r) >= 2) as usize;
        }
        assert!(dup_tokens > 0, "some rows name one expert id twice");
        assert!(triple_tokens > 0, "some rows name one expert id three times");
        assert!(same_rank_tokens > 0, "some rows name distinct experts of one rank");
    }
    assert!(nones > 0, "some selections are -1");
}

#[test]
fn worlds_are_deterministic() {
    let shape = shapes()[3];
    let a = LlWorld::random(&mut SplitMix64::new(42), shape, Routing::SameRankDups);
    let b = LlWorld::random(&mut SplitMix64::new(42), shape, Routing::SameRankDups);
    assert_eq!(a, b);
    assert_eq!(SplitMix64::new(1).next_u64(), SplitMix64::new(1).next_u64());
}

#[test]
#[should_panic(expected = "expert id")]
fn out_of_range_expert_panics() {
    let mut w = tiny();
    w.ranks[0].topk_idx[0] = 4;
    ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Local, POISON);
}

#[test]
#[should_panic(expected = "FLAT")]
fn flat_layout_panics() {
    ll_dispatch_ref(&tiny(), Layout::Flat, ExpertIdKind::Local, POISON);
}

// ---- masks -------------------------------------------------------------------------------------

#[test]
fn links_need_both_sides_active() {
    let masks = vec![vec![true, true, false], vec![true, true, true], vec![true, true, true]];
    let l = LlLinks::from_masks(&masks);
    assert!(l.linked(0, 1) && l.linked(1, 0) && l.linked(1, 2) && l.linked(2, 2));
    // Rank 0 masked rank 2: neither direction carries data.
    assert!(!l.linked(0, 2) && !l.linked(2, 0));
    let w = LlLinks::without(3, &[1]);
    assert!(w.linked(0, 2) && w.linked(0, 0) && !w.linked(0, 1) && !w.linked(1, 1) && !w.linked(1, 2));
    assert_eq!(
        LlLinks::all(2),
        LlLinks::from_masks(&[vec![true, true], vec![true, true]])
    );
}

#[test]
fn masks_with_every_rank_active_change_nothing() {
    for_worlds(|w| {
        let all = LlLinks::all(w.shape.nranks);
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            assert_eq!(
                ll_dispatch_ref_masked(w, layout, ExpertIdKind::Local, POISON, &all),
                ll_dispatch_ref(w, layout, ExpertIdKind::Local, POISON)
            );
        }
    });
}

/// The world with rank x's tokens removed.
fn silence(w: &LlWorld, x: usize) -> LlWorld {
    let mut q = w.clone();
    q.ranks[x] = LlRankInput {
        num_tokens: 0,
        tokens: Vec::new(),
        topk_idx: Vec::new(),
        weights: Vec::new(),
    };
    q
}

/// An independent statement of "absent": seen from the other ranks, a masked rank x is a rank
/// that dispatched no tokens and whose expert outputs are all zero.
#[test]
fn an_absent_rank_is_a_rank_with_no_tokens_and_zero_outputs() {
    let mut checked = 0;
    for_worlds(|w| {
        let sh = w.shape;
        let (n, b, h, k, l) = (sh.nranks, sh.max_tokens, sh.hidden, sh.topk, sh.local_experts());
        if n < 2 {
            return;
        }
        let mut rng = SplitMix64::new(w.ranks[0].num_tokens as u64 * 31 + n as u64);
        for x in 0..n {
            let links = LlLinks::without(n, &[x]);
            let quiet = silence(w, x);
            for layout in [Layout::ExpertMajor, Layout::RankMajor] {
                let got = ll_dispatch_ref_masked(w, layout, ExpertIdKind::Local, POISON, &links);
                let want = ll_dispatch_ref(&quiet, layout, ExpertIdKind::Local, POISON);
                for d in (0..n).filter(|&d| d != x) {
                    assert_eq!(got[d], want[d], "{layout:?}: rank {d} with rank {x} absent");
                }
                let rows = if layout == Layout::ExpertMajor {
                    l * n * b
                } else {
                    n * b
                };
                let outs: Vec<Vec<u16>> = (0..n)
                    .map(|_| (0..rows * h).map(|_| bf(rng.unit_f32() * 4.0 - 2.0)).collect())
                    .collect();
                let mut zeroed = outs.clone();
                zeroed[x].iter_mut().for_each(|v| *v = 0);
                let ws: Vec<Vec<f32>> = (0..n)
                    .map(|s| (0..w.ranks[s].num_tokens * k).map(|_| rng.unit_f32()).collect())
                    .collect();
                let mut ws_quiet = ws.clone();
                ws_quiet[x].clear();
                let (got, want) = match layout {
                    Layout::ExpertMajor => (
                        ll_combine_ref_masked(w, LlCombineIn::ExpertMajor { x: &outs, weights: &ws }, &links),
                        ll_combine_ref(
                            &quiet,
                            LlCombineIn::ExpertMajor {
                                x: &zeroed,
                                weights: &ws_quiet,
                            },
                        ),
                    ),
                    _ => (
                        ll_combine_ref_masked(w, LlCombineIn::RankMajor { y: &outs }, &links),
                        ll_combine_ref(&quiet, LlCombineIn::RankMajor { y: &zeroed }),
                    ),
                };
                for s in (0..n).filter(|&s| s != x) {
                    assert_eq!(got[s], want[s], "{layout:?} combine: rank {s} with rank {x} absent");
                }
                checked += 1;
            }
        }
    });
    assert!(checked > 100, "{checked}");
}

// ---- fp16 and fp32 tokens ----------------------------------------------------------------------

#[test]
fn token_element_types() {
    use ep_core::enums::dtype;
    assert_eq!(
        (u16::nccl_dtype(), Fp16::nccl_dtype(), Fp32::nccl_dtype()),
        (dtype::BFLOAT16, dtype::FLOAT16, dtype::FLOAT32)
    );
    assert_eq!(u16::from_f32(1.0), 0x3F80);
    assert_eq!(Fp16::from_f32(1.0), Fp16(0x3C00));
    assert_eq!(Fp16(0xC000).to_f32(), -2.0);
    assert_eq!(Fp16(0x0001).to_f32(), 2f32.powi(-24), "subnormal");
    // fp16 keeps 10 fraction bits: 1 + 2^-11 is a tie (to even 1.0), 1 + 3·2^-11 one up to 1 + 2^-9.
    assert_eq!(Fp16::from_f32(1.0 + 2f32.powi(-11)), Fp16(0x3C00));
    assert_eq!(Fp16::from_f32(1.0 + 3.0 * 2f32.powi(-11)), Fp16(0x3C02));
    // fp32 is its own bits, signed zero and NaN payloads included.
    for bits in [0u32, 0x8000_0000, 0x3F80_0001, 0x7FC0_1234, 0xFF80_0000] {
        assert_eq!(Fp32::from_f32(f32::from_bits(bits)).0, bits);
        assert_eq!(Fp32(bits).to_f32().to_bits(), bits);
    }
    // Every fp16 value survives f32 and back.
    for h in 0..=u16::MAX {
        let v = Fp16(h).to_f32();
        if !v.is_nan() {
            assert_eq!(Fp16::from_f32(v), Fp16(h), "{h:#06x}");
        }
    }
}

/// Fp16 bits standing for bf16 bits (the same 16 bits), and Fp32 bits built from them.
fn as_fp16(v: u16) -> Fp16 {
    Fp16(v)
}
fn as_fp32(v: u16) -> Fp32 {
    Fp32(v as u32 * 0x0001_0001)
}

fn retype<T: TokenElem>(w: &LlWorld, f: fn(u16) -> T) -> LlWorld<T> {
    LlWorld {
        shape: w.shape,
        ranks: w
            .ranks
            .iter()
            .map(|r| LlRankInput {
                num_tokens: r.num_tokens,
                tokens: r.tokens.iter().map(|&v| f(v)).collect(),
                topk_idx: r.topk_idx.clone(),
                weights: r.weights.clone(),
            })
            .collect(),
    }
}

fn retype_out<T: TokenElem>(o: &LlDispatchOut, f: fn(u16) -> T) -> LlDispatchOut<T> {
    match o {
        LlDispatchOut::ExpertMajor {
            tokens,
            expert_counters,
        } => LlDispatchOut::ExpertMajor {
            tokens: tokens.iter().map(|&v| f(v)).collect(),
            expert_counters: expert_counters.clone(),
        },
        LlDispatchOut::RankMajor {
            tokens,
            topk_idx,
            topk_weights,
            src_rank_counters,
        } => LlDispatchOut::RankMajor {
            tokens: tokens.iter().map(|&v| f(v)).collect(),
            topk_idx: topk_idx.clone(),
            topk_weights: topk_weights.clone(),
            src_rank_counters: src_rank_counters.clone(),
        },
    }
}

/// Dispatch copies rows whatever their type: the fp16 and fp32 worlds made of the same bits give
/// the bf16 outputs, element for element (the rows of fp32 are twice as wide in bytes; the
/// reference, like the kernels, never looks inside them).
#[test]
fn dispatch_moves_bits_whatever_the_type() {
    for_worlds(|w| {
        let (w16, w32) = (retype(w, as_fp16), retype(w, as_fp32));
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            for kind in [ExpertIdKind::Local, ExpertIdKind::Global] {
                let want = ll_dispatch_ref(w, layout, kind, POISON);
                let p16 = LlPoison {
                    token: as_fp16(POISON.token),
                    weight: POISON.weight,
                };
                let p32 = LlPoison {
                    token: as_fp32(POISON.token),
                    weight: POISON.weight,
                };
                let got16 = ll_dispatch_ref(&w16, layout, kind, p16);
                let got32 = ll_dispatch_ref(&w32, layout, kind, p32);
                for d in 0..w.shape.nranks {
                    assert_eq!(got16[d], retype_out(&want[d], as_fp16), "{layout:?} rank {d}");
                    assert_eq!(got32[d], retype_out(&want[d], as_fp32), "{layout:?} rank {d}");
                }
            }
        }
    });
}

/// `round_trips` for fp16 and fp32 tokens: identity experts, EM Σ_k w·x fused in increasing k,
/// RM x times the number of distinct destination ranks, each summed in fp32 and rounded once to
/// the token type (fp32: not at all).
fn typed_round_trips<T: TokenElem>() {
    let mut worlds = 0;
    for (i, shape) in shapes().into_iter().enumerate() {
        for routing in routings(shape.nranks) {
            for seed in 0..4u64 {
                let mut rng = SplitMix64::new(seed * 1000 + 77 + i as u64);
                let w = LlWorld::<T>::random_of(&mut rng, shape, routing);
                let (h, k, l) = (shape.hidden, shape.topk, shape.local_experts());
                let poison = LlPoison {
                    token: T::from_f32(-1234.5),
                    weight: -1.0,
                };
                let em = ll_dispatch_ref(&w, Layout::ExpertMajor, ExpertIdKind::Local, poison);
                let x: Vec<Vec<T>> = em.iter().map(|o| o.tokens().to_vec()).collect();
                let cw: Vec<Vec<f32>> = w
                    .ranks
                    .iter()
                    .map(|r| r.weights.iter().map(|v| 1.0 - v).collect())
                    .collect();
                let out_em = ll_combine_ref(&w, LlCombineIn::ExpertMajor { x: &x, weights: &cw });
                let rm = ll_dispatch_ref(&w, Layout::RankMajor, ExpertIdKind::Local, poison);
                let y: Vec<Vec<T>> = rm.iter().map(|o| o.tokens().to_vec()).collect();
                let out_rm = ll_combine_ref(&w, LlCombineIn::RankMajor { y: &y });
                for (s, inp) in w.ranks.iter().enumerate() {
                    assert_eq!(out_em[s].len(), inp.num_tokens * h);
                    for t in 0..inp.num_tokens {
                        let ids = &inp.topk_idx[t * k..][..k];
                        let mut ranks: Vec<i64> = Vec::new();
                        for &e in ids.iter().filter(|&&e| e >= 0) {
                            if !ranks.contains(&(e / l as i64)) {
                                ranks.push(e / l as i64);
                            }
                        }
                        for j in 0..h {
                            let v = inp.tokens[t * h + j].to_f32();
                            let mut acc = 0f32;
                            for kk in (0..k).filter(|&kk| ids[kk] >= 0) {
                                acc = cw[s][t * k + kk].mul_add(v, acc);
                            }
                            assert_eq!(out_em[s][t * h + j], T::from_f32(acc), "EM {s}/{t}/{j}");
                            let mut acc = 0f32;
                            for _ in &ranks {
                                acc += v;
                            }
                            assert_eq!(out_rm[s][t * h + j], T::from_f32(acc), "RM {s}/{t}/{j}");
                        }
                    }
                }
                worlds += 1;
            }
        }
    }
    assert!(worlds >= 60);
}

#[test]
fn fp16_round_trips() {
    typed_round_trips::<Fp16>();
}

#[test]
fn fp32_round_trips() {
    typed_round_trips::<Fp32>();
}

/// Combine accumulates in fp32 whatever the type and rounds once at the end: the fp16 (and
/// bf16) result is the fp32 result, on the same values, rounded to the type.
#[test]
fn combine_rounds_once_to_the_token_type() {
    fn check<T: TokenElem>(w: &LlWorld, f: fn(u16) -> T, rng: &mut SplitMix64) {
        let sh = w.shape;
        let (n, b, l, h, k) = (sh.nranks, sh.max_tokens, sh.local_experts(), sh.hidden, sh.topk);
        let wt = retype(w, f);
        let widen = |v: &Vec<Vec<T>>| -> Vec<Vec<Fp32>> {
            v.iter()
                .map(|r| r.iter().map(|&e| Fp32::from_f32(e.to_f32())).collect())
                .collect()
        };
        let w32 = LlWorld {
            shape: sh,
            ranks: wt
                .ranks
                .iter()
                .map(|r| LlRankInput {
                    num_tokens: r.num_tokens,
                    tokens: r.tokens.iter().map(|&e| Fp32::from_f32(e.to_f32())).collect(),
                    topk_idx: r.topk_idx.clone(),
                    weights: r.weights.clone(),
                })
                .collect(),
        };
        // Random expert outputs of type T (bits of random bf16 values in [−2, 2), as T).
        let x: Vec<Vec<T>> = (0..n)
            .map(|_| (0..l * n * b * h).map(|_| f(bf(rng.unit_f32() * 4.0 - 2.0))).collect())
            .collect();
        let y: Vec<Vec<T>> = (0..n)
            .map(|_| (0..n * b * h).map(|_| f(bf(rng.unit_f32() * 4.0 - 2.0))).collect())
            .collect();
        let ws: Vec<Vec<f32>> = w
            .ranks
            .iter()
            .map(|r| (0..r.num_tokens * k).map(|_| rng.unit_f32()).collect())
            .collect();
        let (x32, y32) = (widen(&x), widen(&y));
        let pairs = [
            (
                ll_combine_ref(&wt, LlCombineIn::ExpertMajor { x: &x, weights: &ws }),
                ll_combine_ref(&w32, LlCombineIn::ExpertMajor { x: &x32, weights: &ws }),
            ),
            (
                ll_combine_ref(&wt, LlCombineIn::RankMajor { y: &y }),
                ll_combine_ref(&w32, LlCombineIn::RankMajor { y: &y32 }),
            ),
        ];
        for (got, wide) in pairs {
            for s in 0..n {
                let want: Vec<T> = wide[s].iter().map(|v| T::from_f32(v.to_f32())).collect();
                assert_eq!(got[s], want, "rank {s}");
            }
        }
    }
    let mut rng = SplitMix64::new(99);
    for_worlds(|w| {
        check(w, as_fp16, &mut rng);
        check(w, |v| v, &mut rng);
    });
}

/// The shape of a one-rank world of one token of one element, with K experts (all on rank 0).
fn one_token(topk: usize) -> LlShape {
    LlShape {
        nranks: 1,
        num_experts: topk,
        max_tokens: 1,
        hidden: 1,
        topk,
    }
}

fn one_token_world<T: TokenElem>(shape: LlShape, ids: Vec<i64>, weights: Vec<f32>) -> LlWorld<T> {
    LlWorld {
        shape,
        ranks: vec![LlRankInput {
            num_tokens: 1,
            tokens: vec![T::default()],
            topk_idx: ids,
            weights,
        }],
    }
}

/// fp16: 1 + 2^-11 + 2^-11 is 1 + 2^-10 (0x3C01) summed in fp32 and rounded once; rounding
/// after each add would stay at 1.0 (each 2^-11 is a tie to even).
#[test]
fn fp16_combine_rounds_once_by_hand() {
    let shape = one_token(3);
    let w = one_token_world::<Fp16>(shape, vec![0, 1, 2], vec![0.0; 3]);
    let half_ulp = Fp16::from_f32(2f32.powi(-11));
    assert_eq!(half_ulp, Fp16(0x1000));
    let x = vec![vec![Fp16(0x3C00), half_ulp, half_ulp]];
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &[vec![1.0; 3]],
        },
    );
    assert_eq!(out[0], vec![Fp16(0x3C01)]);
    let stepwise = Fp16::from_f32(Fp16::from_f32(1.0 + 2f32.powi(-11)).to_f32() + 2f32.powi(-11));
    assert_eq!(stepwise, Fp16(0x3C00), "rounding each step differs");
    // No valid expert: +0.
    let w = one_token_world::<Fp16>(shape, vec![-1, -1, -1], vec![0.0; 3]);
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &[vec![1.0; 3]],
        },
    );
    assert_eq!(out[0], vec![Fp16(0)]);
}

/// fp32: the output is the fused sum itself. 1·(−1) + (1 + 2^-12)·(1 + 2^-12) is
/// 2^-11 + 2^-24 fused; with a rounded product (a tie, to even) it would be 2^-11.
#[test]
fn fp32_combine_is_the_fused_sum() {
    let a = 1.0 + 2f32.powi(-12);
    let shape = one_token(2);
    let w = one_token_world::<Fp32>(shape, vec![0, 1], vec![0.0; 2]);
    let x = vec![vec![Fp32::from_f32(-1.0), Fp32::from_f32(a)]];
    let out = ll_combine_ref(
        &w,
        LlCombineIn::ExpertMajor {
            x: &x,
            weights: &[vec![1.0, a]],
        },
    );
    let fused = 2f32.powi(-11) + 2f32.powi(-24);
    assert_eq!(out[0], vec![Fp32(fused.to_bits())]);
    assert_eq!(a * a - 1.0, 2f32.powi(-11), "unfused differs");
    // Rank-major adds the destination ranks in first-appearance order: 1 + 2^-24 − 1 is +0,
    // rank order −1 + 2^-24 + 1 would give 2^-24, which fp32 keeps.
    let shape = LlShape {
        nranks: 3,
        num_experts: 3,
        max_tokens: 1,
        hidden: 1,
        topk: 3,
    };
    let empty = LlRankInput {
        num_tokens: 0,
        tokens: vec![],
        topk_idx: vec![],
        weights: vec![],
    };
    let w = LlWorld::<Fp32> {
        shape,
        ranks: vec![
            LlRankInput {
                num_tokens: 1,
                tokens: vec![Fp32(0)],
                topk_idx: vec![2, 1, 0],
                weights: vec![0.0; 3],
            },
            empty.clone(),
            empty,
        ],
    };
    let tiny = 2f32.powi(-24);
    let y: Vec<Vec<Fp32>> = [-1.0, tiny, 1.0]
        .iter()
        .map(|&v| vec![Fp32::from_f32(v), Fp32(0), Fp32(0)])
        .collect();
    let out = ll_combine_ref(&w, LlCombineIn::RankMajor { y: &y });
    assert_eq!(out[0], vec![Fp32(0)]);
    assert_eq!((-1.0 + tiny) + 1.0, tiny, "rank order differs");
}

// ---- quantisation recipes ----------------------------------------------------------------------

/// A third statement of E4M3 (fn) rounding, by bits (round to nearest even on the f32 mantissa,
/// saturating), to check the reference's search against.
fn e4m3_by_bits(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7E;
    }
    // Quantum of the binade (subnormal below 2^-6: quantum 2^-9).
    let e = if a < 2f32.powi(-6) { -6 } else { a.log2().floor() as i32 };
    let e = if 2f32.powi(e) > a { e - 1 } else { e }.max(-6);
    let q = 2f64.powi(e - 3);
    let m = a as f64 / q; // multiples of the quantum, exact in f64
    let r = m.floor();
    let f = m - r;
    let n = if f > 0.5 || (f == 0.5 && r % 2.0 == 1.0) {
        r + 1.0
    } else {
        r
    };
    let v = n * q; // the rounded magnitude
    if v >= 448.0 {
        return sign | 0x7E;
    }
    let code = if v < 2f64.powi(-6) {
        (v / 2f64.powi(-9)) as u8
    } else {
        let ex = v.log2().floor() as i32;
        (((ex + 7) as u8) << 3) | ((v / 2f64.powi(ex) - 1.0) * 8.0) as u8
    };
    sign | code
}

#[test]
fn e4m3_codes_round_trip_and_round_to_nearest_even() {
    for c in 0..=255u8 {
        let v = e4m3_to_f32(c);
        if c & 0x7F == 0x7F {
            assert!(v.is_nan());
            continue;
        }
        assert_eq!(f32_to_e4m3_satfinite(v), c, "{c:#x} = {v}");
    }
    assert_eq!(e4m3_to_f32(0x7E), 448.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    // Ties: halfway between codes goes to the even code.
    assert_eq!(f32_to_e4m3_satfinite(2f32.powi(-10)), 0x00);
    assert_eq!(f32_to_e4m3_satfinite(3.0 * 2f32.powi(-10)), 0x02);
    assert_eq!(f32_to_e4m3_satfinite(1.0 + 1.0 / 16.0), 0x38); // 1 and 1.125: even is 1
    assert_eq!(f32_to_e4m3_satfinite(1.125 + 1.0 / 16.0), 0x3A); // 1.125 and 1.25: even is 1.25
    assert_eq!(f32_to_e4m3_satfinite(1.0 + 1.0 / 15.0), 0x39);
    // Saturation and specials.
    for (x, c) in [
        (448.0, 0x7E),
        (449.0, 0x7E),
        (464.0, 0x7E),
        (1e30, 0x7E),
        (f32::INFINITY, 0x7E),
        (f32::NEG_INFINITY, 0xFE),
        (-500.0, 0xFE),
        (-0.0, 0x80),
        (-1e-9, 0x80),
        (0.0, 0x00),
        (f32::NAN, 0x7F),
    ] {
        assert_eq!(f32_to_e4m3_satfinite(x), c, "{x}");
    }
    // The search and the bit statement agree on many values of every binade.
    // Random f32 of magnitudes 2^-15 .. 2^10 (E4M3's subnormals to past its saturation), and
    // every midpoint between neighbouring codes (exact ties) and its two f32 neighbours.
    let mut rng = SplitMix64::new(7);
    let mut xs: Vec<f32> = (0..200_000)
        .map(|_| {
            let m = 1.0 + (rng.next_u64() >> 41) as f32 / (1u32 << 23) as f32;
            let v = m * 2f32.powi(rng.below(26) as i32 - 15);
            if rng.one_in(2) { -v } else { v }
        })
        .collect();
    for c in 0..0x7Eu8 {
        let mid = (e4m3_to_f32(c) + e4m3_to_f32(c + 1)) / 2.0;
        xs.extend([
            mid,
            -mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits().max(1) - 1),
        ]);
    }
    for x in xs {
        assert_eq!(f32_to_e4m3_satfinite(x), e4m3_by_bits(x), "{x:e} ({:#x})", x.to_bits());
    }
}

/// A hand-computed block: amax 2 gives scale 224 (448/2) and scale_inv 2·fl(1/448); with
/// round_scales the scale is 2^7 (2^-8 < 2/448 <= 2^-7).
#[test]
fn ds_fp8_hand_computed_block() {
    let mut row = vec![0u16; 256];
    row[0] = bf(1.0);
    row[1] = bf(-2.0);
    row[2] = bf(0.5);
    row[127] = bf(-0.0);
    // Second block: all zeros, so amax is the 1e-4 floor.
    let (q, s) = ds_fp8_quantize(&row, false);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0], 2.0 * (1.0f32 / 448.0));
    assert_eq!(&q[..3], &[0x76, 0xFE, 0x6E]); // 224 = 1.75·2^7, -448, 112 = 1.75·2^6
    assert_eq!(q[3], 0x00);
    assert_eq!(q[127], 0x80);
    assert_eq!(s[1], (1e-4f64 as f32) * (1.0f32 / 448.0));
    assert!(q[128..].iter().all(|&c| c == 0));
    let (q, s) = ds_fp8_quantize(&row, true);
    assert_eq!(s[0], 2f32.powi(-7));
    assert_eq!(&q[..3], &[0x70, 0xF8, 0x68]); // 128, -256, 64
    // 1e-4/448 = 2.23e-7 lies in (2^-23, 2^-22].
    assert_eq!(s[1], 2f32.powi(-22));
}

/// On random rows: scales are what the definition says, nothing saturates without round_scales
/// (|x|·448/amax <= 448 up to one rounding), power-of-two scales are powers of two, and the
/// dequantised values are within half an E4M3 step of the input.
#[test]
fn ds_fp8_properties_on_random_rows() {
    let mut rng = SplitMix64::new(99);
    for round in [false, true] {
        for _ in 0..50 {
            let mag = 2f32.powi(rng.below(40) as i32 - 20);
            let row: Vec<u16> = (0..512).map(|_| bf((rng.unit_f32() * 2.0 - 1.0) * mag)).collect();
            let (q, s) = ds_fp8_quantize(&row, round);
            for (b, blk) in row.chunks(128).enumerate() {
                let amax = blk.iter().fold(1e-4f64 as f32, |m, &v| m.max(bf16_to_f32(v).abs()));
                if round {
                    assert_eq!(s[b].to_bits() & 0x7F_FFFF, 0, "a power of two");
                    assert!(s[b] >= amax / 448.0 * 0.999 && s[b] < amax / 448.0 * 2.001);
                } else {
                    assert_eq!(s[b], amax * (1.0f32 / 448.0));
                }
                for (i, &v) in blk.iter().enumerate() {
                    let x = bf16_to_f32(v);
                    let c = q[b * 128 + i];
                    let deq = e4m3_to_f32(c) * s[b];
                    // E4M3 keeps 3 mantissa bits (half step 2^-4 relative) and subnormals of 2^-9.
                    let tol = x.abs() / 16.0 + s[b] * 2f32.powi(-10) + f32::EPSILON * x.abs();
                    assert!((deq - x).abs() <= tol * 1.0001, "x {x} deq {deq} scale {}", s[b]);
                    if !round && x.abs() * (448.0 / amax) < 448.0 {
                        assert_ne!(c & 0x7F, 0x7F);
                    }
                }
            }
        }
    }
}

fn le_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Byte-row placement is token placement: a bf16 world's rows as bytes land where
/// `ll_dispatch_ref` puts the tokens, in both layouts, with and without an absent rank.
#[test]
fn byte_rows_land_where_tokens_land() {
    let poison = LlPoison {
        token: 0xABAB,
        weight: 0.0,
    };
    for_worlds(|w| {
        let n = w.shape.nranks;
        let rows: Vec<Vec<u8>> = w.ranks.iter().map(|r| le_bytes(&r.tokens)).collect();
        let mut all_links = vec![LlLinks::all(n)];
        if n > 1 {
            all_links.push(LlLinks::without(n, &[n - 1]));
        }
        for links in &all_links {
            for layout in [Layout::ExpertMajor, Layout::RankMajor] {
                let want = ll_dispatch_ref_masked(w, layout, ExpertIdKind::Local, poison, links);
                let got = ll_dispatch_rows_ref(w, layout, links, &rows, 2 * w.shape.hidden, 0xAB);
                for d in 0..n {
                    assert_eq!(got[d], le_bytes(want[d].tokens()), "rank {d} {layout:?}");
                }
            }
        }
    });
}

/// QUANT_FWD moves token and scale bytes as two row sets of one routing; DS_FP8E3M4 is
/// QUANT_FWD of the quantised rows.
#[test]
fn recipes_are_placements_of_their_rows() {
    let mut rng = SplitMix64::new(5);
    let shape = LlShape {
        nranks: 3,
        num_experts: 12,
        max_tokens: 6,
        hidden: 512,
        topk: 4,
    };
    for routing in routings(3) {
        let w = LlWorld::random(&mut rng, shape, routing);
        let links = LlLinks::all(3);
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            let tok: Vec<Vec<u8>> = w.ranks.iter().map(|r| le_bytes(&r.tokens)).collect();
            let sc: Vec<Vec<u8>> = w
                .ranks
                .iter()
                .map(|r| (0..r.num_tokens * 32).map(|i| (i * 7 + 3) as u8).collect())
                .collect();
            let o = ll_dispatch_fwd_ref(&w, layout, &links, (&tok, 1024), (&sc, 32), 0x5A);
            let want_t = ll_dispatch_rows_ref(&w, layout, &links, &tok, 1024, 0x5A);
            let want_s = ll_dispatch_rows_ref(&w, layout, &links, &sc, 32, 0x5A);
            for d in 0..3 {
                assert_eq!(o[d].tokens, want_t[d]);
                assert_eq!(o[d].scales, want_s[d]);
            }
            for round in [false, true] {
                let ds = ll_dispatch_ds_fp8_ref(&w, layout, &links, round, 0x5A);
                let (mut qt, mut qs) = (Vec::new(), Vec::new());
                for r in &w.ranks {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    for row in r.tokens.chunks(512) {
                        let (q, s) = ds_fp8_quantize(row, round);
                        a.extend(q);
                        b.extend(s.iter().flat_map(|v| v.to_le_bytes()));
                    }
                    qt.push(a);
                    qs.push(b);
                }
                let wt = ll_dispatch_rows_ref(&w, layout, &links, &qt, 512, 0x5A);
                let ws = ll_dispatch_rows_ref(&w, layout, &links, &qs, 16, 0x5A);
                for (d, o) in ds.iter().enumerate() {
                    assert_eq!(o.tokens, wt[d]);
                    assert_eq!(o.scales, ws[d]);
                }
            }
        }
    }
}

// ---- NVFP4 combine ---------------------------------------------------------------------------

/// The kernel's software conversions (kernels/ll_combine.cu, `f32_to_e2m1_sw` and
/// `f32_to_e4m3_sw`), restated line for line: comparisons against the rounding midpoints, and
/// a bit-level round-to-nearest-even. The reference finds the nearest table value instead; the
/// two must agree on every input.
fn kernel_e2m1(x: f32) -> u8 {
    let a = x.abs();
    #[allow(clippy::eq_op)]
    let s = if a == a { ((x.to_bits() >> 31) << 3) as u8 } else { 0 };
    let c = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    c | s
}

fn kernel_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let s = ((bits >> 24) & 0x80) as u8;
    let u = bits & 0x7FFF_FFFF;
    let c = if u > 0x7F80_0000 {
        0x7F
    } else if u >= 0x43E0_0000 {
        0x7E
    } else if u < 0x3C80_0000 {
        (f32::from_bits(u) * 512.0).round_ties_even() as u32
    } else {
        let r = (u + 0x7FFFF + ((u >> 20) & 1)) >> 20;
        r - ((127 - 7) << 3)
    };
    c as u8 | s
}

/// Inputs that stress the conversions: every f32 with the low 12 bits clear over the whole
/// range, every rounding midpoint and its neighbours, and random bit patterns.
fn conversion_inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..1u32 << 20).map(|i| f32::from_bits(i << 12)).collect();
    let mut mids: Vec<f32> = vec![0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 448.0, 464.0, 480.0];
    for c in 0..0x7Eu8 {
        let (a, b) = (e4m3_to_f32(c), e4m3_to_f32(c + 1));
        mids.push(((a as f64 + b as f64) / 2.0) as f32);
        mids.push(a);
    }
    for m in mids {
        for d in -3i32..=3 {
            let x = f32::from_bits((m.to_bits() as i64 + d as i64).max(0) as u32);
            v.push(x);
            v.push(-x);
        }
    }
    let mut rng = SplitMix64::new(0xF4);
    v.extend((0..1 << 20).map(|_| f32::from_bits(rng.next_u64() as u32)));
    v
}

#[test]
fn nvfp4_conversions_by_hand() {
    // E2M1: ties to the even code, saturation at 6, the sign kept.
    for (x, c) in [
        (0.25, 0),
        (0.2501, 1),
        (0.75, 2),
        (1.25, 2),
        (1.75, 4),
        (2.5, 4),
        (3.5, 6),
        (5.0, 6),
        (5.001, 7),
        (6.0, 7),
        (1e30, 7),
        (f32::INFINITY, 7),
        (-0.1, 8),
        (-0.3, 9),
        (-6.5, 15),
        (-0.0, 8),
    ] {
        assert_eq!(f32_to_e2m1(x), c, "E2M1({x})");
    }
    for c in 0..16u8 {
        assert_eq!(f32_to_e2m1(e2m1_to_f32(c)), c, "E2M1 code {c} round-trips");
    }
    // E4M3: bias 7, subnormals of 2^-9, 448 the largest, ties to even.
    for (x, c) in [
        (1.0, 0x38),
        (448.0, 0x7E),
        (463.9, 0x7E),
        (1e9, 0x7E),
        (f32::INFINITY, 0x7E),
        (2f32.powi(-6), 0x08),
        (2f32.powi(-9), 0x01),
        (2f32.powi(-10), 0x00),
        (3.0 * 2f32.powi(-10), 0x02),
        (17.0, 0x58),
        (19.0, 0x5A),
        (-1.0, 0xB8),
    ] {
        assert_eq!(f32_to_e4m3(x), c, "E4M3({x})");
    }
    assert!(e4m3_to_f32(0x7F).is_nan());
    for c in (0..=0xFFu8).filter(|c| c & 0x7F != 0x7F) {
        assert_eq!(f32_to_e4m3(e4m3_to_f32(c)), c, "E4M3 code {c:#x} round-trips");
    }
}

/// The kernel's software conversions equal the reference's on every input of
/// `conversion_inputs` (NaN included: code 7 / 0x7F with the input's sign).
#[test]
fn nvfp4_kernel_conversions_match_the_definition() {
    let mut checked = 0usize;
    for x in conversion_inputs() {
        assert_eq!(kernel_e2m1(x), f32_to_e2m1(x), "E2M1({x:e}, {:#x})", x.to_bits());
        assert_eq!(kernel_e4m3(x), f32_to_e4m3(x), "E4M3({x:e}, {:#x})", x.to_bits());
        checked += 1;
    }
    assert!(checked > 2_000_000);
}

/// One 16-element row by hand: amax 6, so g = 448 and the block scale is 448 (E4M3 0x7E);
/// values already on the E2M1 grid come back exactly.
#[test]
fn nvfp4_encode_one_block_by_hand() {
    let vals = [
        6.0, -3.0, 1.5, 0.5, 0.0, -0.0, 4.0, -6.0, 2.0, 1.0, -0.5, 3.0, 0.0, 0.0, 0.0, 1.5,
    ];
    let row: Vec<u16> = vals.iter().map(|&v| bf(v)).collect();
    let g = nvfp4_global_scale(&row);
    assert_eq!(g, 448.0);
    let m = nvfp4_encode_row(&row, g);
    assert_eq!(m.len(), 16);
    assert_eq!(nvfp4_slot_bytes(16), 16);
    // Element 2i in the low nibble of byte i.
    assert_eq!(&m[..8], &[0xD7, 0x13, 0x80, 0xF6, 0x24, 0x59, 0x00, 0x30]);
    assert_eq!(m[8], 0x7E);
    assert_eq!(&m[9..13], &448f32.to_le_bytes());
    assert_eq!(&m[13..], &[0, 0, 0]);
    let mut acc = vec![0f32; 16];
    nvfp4_decode_add(&m, 0.5, &mut acc);
    for (a, v) in acc.iter().zip(vals) {
        assert_eq!(*a, v * 0.5);
    }
}

/// A row of zeros has global scale 0: every byte of the message is 0 and it decodes to +0.
#[test]
fn nvfp4_zero_row() {
    let row = vec![0u16; 512];
    assert_eq!(nvfp4_global_scale(&row), 0.0);
    let m = nvfp4_encode_row(&row, 0.0);
    assert_eq!(m.len(), nvfp4_slot_bytes(512));
    assert!(m.iter().all(|&b| b == 0));
    let mut acc = vec![0f32; 512];
    nvfp4_decode_add(&m, 0.7, &mut acc);
    assert!(acc.iter().all(|a| a.to_bits() == 0));
}

/// The documented bound (docs/LL.md, "NVFP4 combine", error bound) on |x − decoded x| for one
/// element of a row with block maximum `m` and row maximum `amax` (g = 2688 / amax). With
/// S = g·m/6 and sc = E4M3(S): a normal sc is within 2^-4·S of S, so |x·g/sc| <= 6/(1 − 2^-4)
/// = 6.4 and E2M1 rounding (a half step is at most 1, saturation above 6 at most 0.4) errs by
/// at most 1, times sc/g <= (17/16)·m/6. A subnormal sc is within 2^-10 of S, adding at most
/// 6·2^-10/g = amax·2^-10/448; a block whose scale rounds to 0 decodes to 0 with m <= that.
fn nvfp4_element_bound(m: f64, amax: f64) -> f64 {
    (17.0 / 96.0) * m + amax * 2f64.powi(-10) / 448.0 + 1e-30
}

/// NVFP4 combine against the exact combine of the same bf16 expert outputs (in f64): every
/// output element within Σ_k |w_k|·bound(block max, row max) plus the two bf16 roundings
/// (2^-9 of the magnitude each), on random worlds of both layouts, K up to 8, duplicate
/// experts, rows of zeros and rows of very different magnitudes.
#[test]
fn nvfp4_combine_error_bound() {
    let mut rng = SplitMix64::new(0x4F4);
    let mut worst = 0f64;
    for (i, layout) in [Layout::ExpertMajor, Layout::RankMajor]
        .into_iter()
        .cycle()
        .take(12)
        .enumerate()
    {
        let shape = LlShape {
            nranks: [1, 2, 4][i % 3],
            num_experts: [8, 8, 16][i % 3],
            max_tokens: 6,
            hidden: [512, 1024, 2048][i % 3],
            topk: [1, 3, 8][(i / 2) % 3],
        };
        let routing = [Routing::Uniform, Routing::SameRankDups][i % 2];
        let world = LlWorld::random(&mut rng, shape, routing);
        let (n, b, h, k) = (shape.nranks, shape.max_tokens, shape.hidden, shape.topk);
        let rows = match layout {
            Layout::ExpertMajor => shape.local_experts() * n * b,
            _ => n * b,
        };
        // Rows: random magnitude per row, some all zero, some with a huge outlier.
        let xs: Vec<Vec<u16>> = (0..n)
            .map(|_| {
                (0..rows)
                    .flat_map(|_| {
                        let kind = rng.below(8);
                        let mag = 2f32.powi(rng.below(40) as i32 - 20);
                        let spike = rng.below(h);
                        (0..h)
                            .map(|e| match kind {
                                0 => 0.0,
                                1 if e == spike => mag * 1000.0,
                                _ => (rng.unit_f32() * 2.0 - 1.0) * mag,
                            })
                            .map(bf)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect();
        let ws: Vec<Vec<f32>> = world
            .ranks
            .iter()
            .map(|r| (0..r.num_tokens * k).map(|_| rng.unit_f32() * 2.0 - 1.0).collect())
            .collect();
        let scales: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| x.chunks(h).map(nvfp4_global_scale).collect())
            .collect();
        let input = match layout {
            Layout::ExpertMajor => LlCombineIn::ExpertMajor { x: &xs, weights: &ws },
            _ => LlCombineIn::RankMajor { y: &xs },
        };
        let got = ll_combine_nvfp4_ref(&world, input, &scales);
        let route = LlRoute::new(&world);
        for s in 0..n {
            for t in 0..world.ranks[s].num_tokens {
                // (weight, rank, row) of every contribution.
                let parts: Vec<(f64, usize, usize)> = match layout {
                    Layout::ExpertMajor => (0..k)
                        .filter_map(|kk| {
                            let (d, le, row) = route.em_row(&world, s, t, kk)?;
                            Some((ws[s][t * k + kk] as f64, d, le * n * b + row))
                        })
                        .collect(),
                    _ => route
                        .dests(s, t)
                        .iter()
                        .map(|&(d, slot)| (1.0, d, s * b + slot))
                        .collect(),
                };
                for e in 0..h {
                    let mut exact = 0f64;
                    let mut bound = 0f64;
                    for &(w, d, row) in &parts {
                        let r = &xs[d][row * h..][..h];
                        let blk = &r[e / 16 * 16..][..16];
                        let m = blk.iter().map(|&v| bf16_to_f32(v).abs() as f64).fold(0.0, f64::max);
                        let amax = r.iter().map(|&v| bf16_to_f32(v).abs() as f64).fold(0.0, f64::max);
                        exact += w * bf16_to_f32(r[e]) as f64;
                        bound += w.abs() * nvfp4_element_bound(m, amax);
                    }
                    let g = bf16_to_f32(got[s][t * h + e]) as f64;
                    let tol = bound * (1.0 + 2f64.powi(-8)) + (exact.abs() + g.abs()) * 2f64.powi(-9);
                    let err = (g - exact).abs();
                    assert!(
                        err <= tol,
                        "{layout:?} {shape:?} rank {s} token {t} element {e}: got {g}, exact {exact}, bound {tol}"
                    );
                    if bound > 0.0 {
                        worst = worst.max(err / tol);
                    }
                }
            }
        }
    }
    // The bound is not vacuous: some element uses more than half of it (0.965 with this seed).
    eprintln!("NVFP4 combine: worst error / bound = {worst:.3}");
    assert!(worst > 0.5 && worst <= 1.0, "worst error / bound = {worst}");
}

/// Same routing, same order: on rows already on the E2M1 grid with block maxima 6·2^j (so
/// every scale and reciprocal is exact), NVFP4 combine equals the bf16 combine bit for bit.
#[test]
fn nvfp4_combine_is_exact_on_grid_rows() {
    let mut rng = SplitMix64::new(0x6F4);
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let shape = LlShape {
            nranks: 2,
            num_experts: 8,
            max_tokens: 5,
            hidden: 512,
            topk: 4,
        };
        let world = LlWorld::random(&mut rng, shape, Routing::SameRankDups);
        let (n, b, h) = (shape.nranks, shape.max_tokens, shape.hidden);
        let rows = match layout {
            Layout::ExpertMajor => shape.local_experts() * n * b,
            _ => n * b,
        };
        let xs: Vec<Vec<u16>> = (0..n)
            .map(|_| {
                (0..rows * h / 16)
                    .flat_map(|_| {
                        let p = 2f32.powi(rng.below(8) as i32 - 4);
                        let mut blk: Vec<f32> = (0..16).map(|_| e2m1_to_f32(rng.below(16) as u8) * p).collect();
                        blk[rng.below(16)] = 6.0 * p;
                        blk.into_iter().map(bf).collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect();
        // g = 1: the block scale is m/6 = p, a power of two, and every reciprocal is exact.
        let scales: Vec<Vec<f32>> = (0..n).map(|_| vec![1.0; rows]).collect();
        let ws: Vec<Vec<f32>> = world
            .ranks
            .iter()
            .map(|r| (0..r.num_tokens * shape.topk).map(|_| rng.unit_f32()).collect())
            .collect();
        let (input, exact) = match layout {
            Layout::ExpertMajor => (
                LlCombineIn::ExpertMajor { x: &xs, weights: &ws },
                ll_combine_ref(&world, LlCombineIn::ExpertMajor { x: &xs, weights: &ws }),
            ),
            _ => (
                LlCombineIn::RankMajor { y: &xs },
                ll_combine_ref(&world, LlCombineIn::RankMajor { y: &xs }),
            ),
        };
        assert_eq!(ll_combine_nvfp4_ref(&world, input, &scales), exact, "{layout:?}");
    }
}
