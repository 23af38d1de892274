//! The HT CPU reference (src/core/ht_reference.rs) against hand-computed cases and against
//! independent re-statements of docs/HT.md's rules on random routings.

use ep_core::enums::{ExpertIdKind, Layout, OverflowPolicy, PassDir};
use ep_reference::ht::*;
use ep_reference::ll::{LlShape, Routing, SplitMix64, bf16_to_f32, f32_to_bf16_rne, gen_routing};

const P: u8 = 0xCD;

fn pw() -> f32 {
    f32::from_bits(u32::from_ne_bytes([P; 4]))
}
fn pi() -> i64 {
    i64::from_ne_bytes([P; 8])
}

// ---- fp16 ------------------------------------------------------------------------------------

#[test]
fn f16_known_values() {
    assert_eq!(f32_to_f16_rne(1.0), 0x3C00);
    assert_eq!(f32_to_f16_rne(-2.0), 0xC000);
    assert_eq!(f32_to_f16_rne(0.0), 0x0000);
    assert_eq!(f32_to_f16_rne(-0.0), 0x8000);
    assert_eq!(f32_to_f16_rne(65504.0), 0x7BFF);
    // 65520 is halfway between 65504 and 65536 (out of range): ties to even gives infinity.
    assert_eq!(f32_to_f16_rne(65519.996), 0x7BFF);
    assert_eq!(f32_to_f16_rne(65520.0), 0x7C00);
    assert_eq!(f32_to_f16_rne(1e9), 0x7C00);
    assert_eq!(f32_to_f16_rne(f32::NEG_INFINITY), 0xFC00);
    // Subnormals: 2^-24 is the smallest; 2^-25 is a tie with zero (even: zero); a bit above
    // rounds up.
    assert_eq!(f32_to_f16_rne(2f32.powi(-24)), 0x0001);
    assert_eq!(f32_to_f16_rne(2f32.powi(-25)), 0x0000);
    assert_eq!(f32_to_f16_rne(-2f32.powi(-25)), 0x8000);
    assert_eq!(f32_to_f16_rne(2f32.powi(-25) * 1.0001), 0x0001);
    assert_eq!(f32_to_f16_rne(3.0 * 2f32.powi(-25)), 0x0002, "1.5 units: tie to even 2");
    assert_eq!(f32_to_f16_rne(2f32.powi(-14)), 0x0400, "smallest normal");
    assert_eq!(
        f32_to_f16_rne(2f32.powi(-14) - 2f32.powi(-25)),
        0x0400,
        "rounds up into the normals"
    );
    assert_eq!(f32_to_f16_rne(f32::from_bits(1)), 0x0000, "f32 subnormal");
    // Ties in the normal range: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    assert_eq!(f32_to_f16_rne(1.0 + 2f32.powi(-11)), 0x3C00);
    assert_eq!(f32_to_f16_rne(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
    assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
    assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
    assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
}

#[test]
fn f16_nan_stays_nan() {
    for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF] {
        let h = f32_to_f16_rne(f32::from_bits(bits));
        assert!(f16_to_f32(h).is_nan(), "{bits:#x} -> {h:#x}");
        assert_eq!(h & 0x8000, ((bits >> 16) as u16) & 0x8000, "sign kept");
    }
    assert!(f16_to_f32(0x7E00).is_nan());
}

#[test]
fn f16_round_trips_every_value() {
    for h in 0..=u16::MAX {
        let f = f16_to_f32(h);
        if f.is_nan() {
            assert!(f16_to_f32(f32_to_f16_rne(f)).is_nan());
        } else {
            assert_eq!(f32_to_f16_rne(f), h, "{h:#x} = {f}");
        }
    }
}

/// Nearest-even rounding restated: the f16 neighbours of x found by search, compared in f64.
#[test]
fn f16_rounding_matches_a_search_on_random_values() {
    let finite: Vec<(f64, u16)> = (0..0x7C00u16).map(|h| (f16_to_f32(h) as f64, h)).collect();
    let mut rng = SplitMix64::new(7);
    for i in 0..200_000 {
        // Spread over the whole f16 range and a bit beyond, both signs.
        let mag = f32::from_bits(0x3000_0000 + (rng.next_u64() % 0x1800_0000) as u32);
        let x = if i % 2 == 0 { mag } else { -mag };
        let a = x.abs() as f64;
        let want = if a >= 65520.0 {
            0x7C00
        } else {
            let j = finite.partition_point(|&(v, _)| v <= a);
            let (lo, hlo) = finite[j - 1];
            match finite.get(j) {
                None => hlo,
                Some(&(hi, hhi)) => {
                    let (dl, dh) = (a - lo, hi - a);
                    if dl < dh || (dl == dh && hlo % 2 == 0) {
                        hlo
                    } else {
                        hhi
                    }
                }
            }
        };
        let want = want | if x < 0.0 { 0x8000 } else { 0 };
        assert_eq!(f32_to_f16_rne(x), want, "x = {x:e} ({:#x})", x.to_bits());
    }
}

#[test]
fn dtype_encode_decode() {
    let v = [1.0f32, -2.5, 0.1, 3.0e38];
    assert_eq!(HtDtype::F32.decode(&HtDtype::F32.encode(&v)), v);
    let b = HtDtype::Bf16.encode(&v);
    assert_eq!(b.len(), 8);
    assert_eq!(u16::from_le_bytes([b[0], b[1]]), 0x3F80);
    assert_eq!(HtDtype::Bf16.decode(&b)[2], bf16_to_f32(f32_to_bf16_rne(0.1)));
    let h = HtDtype::F16.encode(&v);
    assert_eq!(u16::from_le_bytes([h[2], h[3]]), 0xC100);
    assert_eq!(HtDtype::F16.decode(&h)[3], f32::INFINITY);
    for dt in HtDtype::ALL {
        assert_eq!(HtDtype::from_nccl(dt.nccl()), Some(dt));
    }
    assert_eq!(HtDtype::from_nccl(ep_core::enums::dtype::FLOAT8E4M3), None);
}

// ---- routing validation ----------------------------------------------------------------------

#[test]
fn bad_ids_are_found_in_row_major_order() {
    assert_eq!(
        find_bad_expert_id(&[0, -1, 3, 3], 2, 4),
        None,
        "−1 and repeats are fine"
    );
    assert_eq!(find_bad_expert_id(&[0, 1, 4, -2], 2, 4), Some((1, 0, 4)));
    // Any negative id means "none", as in NCCL EP (these two were errors).
    assert_eq!(find_bad_expert_id(&[0, 1, 2, -2], 2, 4), None);
    assert_eq!(find_bad_expert_id(&[i64::MIN], 1, 4), None);
    assert_eq!(find_bad_expert_id(&[-5, 7], 1, 4), Some((1, 0, 7)));
    assert_eq!(topk_from_i32(&[-1, 7]), vec![-1, 7]);
    let bytes: Vec<u8> = [5i32, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(topk_from_bytes(&bytes, ep_core::enums::dtype::INT32), vec![5, -1]);
    let bytes: Vec<u8> = [9i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(topk_from_bytes(&bytes, ep_core::enums::dtype::INT64), vec![9, -1]);
}

#[test]
fn plan_reports_the_lowest_rank_with_a_bad_id_and_capture_treats_it_as_none() {
    let cfg = flat_cfg(0);
    let routing = vec![vec![0, 1, 2, 3], vec![0, 9, -7, 1]];
    let err = HtPlan::new(cfg, &routing).unwrap_err();
    assert_eq!(
        err,
        HtPlanError::BadExpertId(BadExpertId {
            rank: 1,
            row: 0,
            k: 1,
            value: 9,
            num_experts: 4
        })
    );
    let e = err.to_error();
    assert_eq!(e.code(), 4);
    assert!(
        e.msg.contains("topk_idx[0][1] is 9") && e.msg.contains("[0, 4)"),
        "{}",
        e.msg
    );
    let plan = HtPlan::captured(cfg, &routing);
    assert_eq!(plan.routing(1), &[0, -1, -1, 1]);
    assert!(!plan.async_error);
    // Rank 1's token 0 now reaches only expert 0 (rank 0); token 1 only expert 1 (rank 0).
    assert_eq!(plan.rank(0).count, 3);
    assert_eq!(plan.rank(1).count, 1);
}

#[test]
fn negative_ids_of_any_value_mean_none() {
    let cfg = flat_cfg(0);
    let neg = HtPlan::new(cfg, &[vec![0, -5, i64::MIN, 3], vec![-2, 1, 2, -1]]).unwrap();
    let ones = HtPlan::new(cfg, &[vec![0, -1, -1, 3], vec![-1, 1, 2, -1]]).unwrap();
    assert_eq!(neg.routing(0), &[0, -1, -1, 3]);
    assert_eq!(neg.routing(1), ones.routing(1));
    for r in 0..2 {
        assert_eq!(neg.rank(r).count, ones.rank(r).count);
    }
}

// ---- the hand-computed world: N=2, E=4 (L=2), K=2, T=3, H=8 ------------------------------------
//
// rank 0: t0 → [1, 2], t1 → [3, 0], t2 → [−1, −1]
// rank 1: t0 → [0, 1], t1 → [2, 2] (a repeat), t2 → [3, −1]

const H: usize = 8;
const K: usize = 2;

fn routing() -> Vec<Vec<i64>> {
    vec![vec![1, 2, 3, 0, -1, -1], vec![0, 1, 2, 2, 3, -1]]
}

fn weights() -> Vec<Vec<f32>> {
    vec![
        vec![0.5, 0.25, 0.125, 0.75, 1.0, 1.0],
        vec![0.1, 0.2, 0.3, 0.4, 0.6, 0.7],
    ]
}

/// Token t of rank r holds 100r + 10t + h (exact in bf16).
fn tok(r: usize, t: usize) -> Vec<u8> {
    HtDtype::Bf16.encode(&(0..H).map(|h| (100 * r + 10 * t + h) as f32).collect::<Vec<_>>())
}

fn tokens() -> Vec<Vec<u8>> {
    (0..2).map(|r| (0..3).flat_map(|t| tok(r, t)).collect()).collect()
}

fn flat_cfg(budget: usize) -> HtConfig {
    HtConfig {
        nranks: 2,
        num_experts: 4,
        topk: K,
        layout: Layout::Flat,
        alignment: 0,
        budget,
        policy: OverflowPolicy::Trap,
    }
}

fn em_cfg(alignment: usize, budget: usize) -> HtConfig {
    HtConfig {
        layout: Layout::ExpertMajor,
        alignment,
        ..flat_cfg(budget)
    }
}

fn row(v: &[u8], rb: usize, i: usize) -> &[u8] {
    &v[i * rb..(i + 1) * rb]
}

fn dispatch_in<'a>(tokens: &'a [Vec<u8>], weights: &'a [Vec<f32>], pass: PassDir) -> HtDispatchIn<'a> {
    HtDispatchIn {
        dtype: HtDtype::Bf16,
        hidden: H,
        pass,
        recv_kind: ExpertIdKind::Local,
        tokens,
        weights,
        poison: P,
    }
}

/// Combine inputs in f32: row i of rank d holds 100d + 10i + h.
fn combine_x(rows: [usize; 2]) -> Vec<Vec<u8>> {
    (0..2)
        .map(|d| {
            let v: Vec<f32> = (0..rows[d])
                .flat_map(|i| (0..H).map(move |h| (100 * d + 10 * i + h) as f32))
                .collect();
            HtDtype::F32.encode(&v)
        })
        .collect()
}

fn combine_f32(plan: &HtPlan, x: &[Vec<u8>], pass: PassDir, g: &[Vec<f32>]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let inp = HtCombineIn {
        dtype: HtDtype::F32,
        hidden: H,
        pass,
        tokens: x,
        weights: g,
    };
    plan.combine_all(&inp)
        .into_iter()
        .map(|o| (HtDtype::F32.decode(&o.tokens), o.topk_weights))
        .collect()
}

/// Row t of a combine output [T, H] as f32 values a + h·b.
fn line(a: f32, b: f32) -> Vec<f32> {
    (0..H).map(|h| a + b * h as f32).collect()
}

#[test]
fn flat_metadata() {
    let plan = HtPlan::new(flat_cfg(5), &routing()).unwrap();
    let r0 = plan.rank(0);
    assert_eq!((r0.recv_total, r0.count, r0.dropped), (3, 3, 0));
    assert_eq!(
        r0.slots,
        vec![
            HtSlot::Token {
                src_rank: 0,
                src_token: 0,
                experts: vec![(1, 0)]
            },
            HtSlot::Token {
                src_rank: 0,
                src_token: 1,
                experts: vec![(0, 1)]
            },
            HtSlot::Token {
                src_rank: 1,
                src_token: 0,
                experts: vec![(0, 0), (1, 1)]
            },
        ]
    );
    assert_eq!(r0.expert_counters, vec![2, 2]);
    assert!(r0.expert_offsets.is_empty());
    let r1 = plan.rank(1);
    assert_eq!((r1.recv_total, r1.count), (4, 4));
    let src: Vec<(usize, usize)> = r1
        .slots
        .iter()
        .map(|s| match s {
            HtSlot::Token {
                src_rank, src_token, ..
            } => (*src_rank, *src_token),
            _ => panic!(),
        })
        .collect();
    assert_eq!(src, vec![(0, 0), (0, 1), (1, 1), (1, 2)], "(source rank, token) order");
    // The repeated id counts once.
    assert_eq!(
        r1.slots[2],
        HtSlot::Token {
            src_rank: 1,
            src_token: 1,
            experts: vec![(0, 0)]
        }
    );
    assert_eq!(r1.expert_counters, vec![2, 2]);
    assert_eq!(
        plan.sends(0, 0),
        &[
            HtSend {
                rank: 0,
                local: None,
                slot: Some(0)
            },
            HtSend {
                rank: 1,
                local: None,
                slot: Some(0)
            }
        ]
    );
    assert!(plan.sends(0, 2).is_empty());
}

#[test]
fn flat_forward_dispatch() {
    let plan = HtPlan::new(flat_cfg(5), &routing()).unwrap();
    let (x, w) = (tokens(), weights());
    let inp = dispatch_in(&x, &w, PassDir::Forward);
    let rb = H * 2;
    let o = plan.dispatch(0, &inp, 6);
    assert_eq!(row(&o.tokens, rb, 0), tok(0, 0));
    assert_eq!(row(&o.tokens, rb, 1), tok(0, 1));
    assert_eq!(row(&o.tokens, rb, 2), tok(1, 0));
    for i in 3..6 {
        assert!(row(&o.tokens, rb, i).iter().all(|&b| b == P), "row {i} not written");
    }
    assert_eq!(o.topk_idx, vec![1, -1, 0, -1, 0, 1, -1, -1, -1, -1, pi(), pi()]);
    let p = pw().to_bits();
    let bits: Vec<u32> = o.topk_weights.iter().map(|x| x.to_bits()).collect();
    let want: Vec<u32> = [0.5, 0.0, 0.75, 0.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0]
        .iter()
        .map(|x: &f32| x.to_bits())
        .chain([p, p])
        .collect();
    assert_eq!(bits, want);

    let global = HtDispatchIn {
        recv_kind: ExpertIdKind::Global,
        ..inp
    };
    let o = plan.dispatch(1, &global, 5);
    assert_eq!(o.topk_idx, vec![2, -1, 3, -1, 2, -1, 3, -1, -1, -1]);
    assert_eq!(
        o.topk_weights,
        vec![0.25, 0.0, 0.125, 0.0, 0.3, 0.0, 0.6, 0.0, 0.0, 0.0]
    );
    assert_eq!(row(&o.tokens, rb, 2), tok(1, 1));
    assert_eq!(row(&o.tokens, rb, 3), tok(1, 2));
}

#[test]
fn flat_backward_dispatch_moves_tokens_only() {
    let plan = HtPlan::new(flat_cfg(5), &routing()).unwrap();
    let x = tokens();
    let o = plan.dispatch(1, &dispatch_in(&x, &[], PassDir::Backward), 5);
    let fwd = plan.dispatch(1, &dispatch_in(&x, &weights(), PassDir::Forward), 5);
    assert_eq!(o.tokens, fwd.tokens);
    assert!(o.topk_idx.is_empty() && o.topk_weights.is_empty());
}

#[test]
fn flat_combine_forward_and_backward() {
    let plan = HtPlan::new(flat_cfg(5), &routing()).unwrap();
    let x = combine_x([3, 4]);
    let out = combine_f32(&plan, &x, PassDir::Forward, &[]);
    let r0: Vec<f32> = [line(100.0, 2.0), line(120.0, 2.0), line(0.0, 0.0)].concat();
    assert_eq!(out[0].0, r0, "unrouted token 2 is zero");
    assert!(out[0].1.is_empty());
    let r1: Vec<f32> = [line(20.0, 1.0), line(120.0, 1.0), line(130.0, 1.0)].concat();
    assert_eq!(out[1].0, r1);

    // g_d[i][j] = 100d + 10i + j, in forward's compacted ascending layout.
    let g: Vec<Vec<f32>> = (0..2)
        .map(|d| {
            (0..5)
                .flat_map(|i| (0..K).map(move |j| (100 * d + 10 * i + j) as f32))
                .collect()
        })
        .collect();
    let out = combine_f32(&plan, &x, PassDir::Backward, &g);
    assert_eq!(out[0].1, vec![0.0, 100.0, 110.0, 10.0, 0.0, 0.0]);
    assert_eq!(
        out[1].1,
        vec![20.0, 21.0, 120.0, 120.0, 130.0, 0.0],
        "a repeat gets the value twice"
    );
    assert_eq!(out[0].0, r0, "backward tokens as forward");
}

#[test]
fn em_metadata_padding_and_dispatch() {
    let plan = HtPlan::new(em_cfg(4, 8), &routing()).unwrap();
    let r0 = plan.rank(0);
    assert_eq!((r0.recv_total, r0.count), (8, 8));
    assert_eq!(r0.expert_counters, vec![4, 4], "padded counts");
    assert_eq!(r0.expert_offsets, vec![0, 4]);
    assert_eq!(r0.expert_pairs, vec![2, 2]);
    let e = |s, t, l, k| HtSlot::Expert {
        src_rank: s,
        src_token: t,
        local: l,
        k,
    };
    let pad = HtSlot::Padding;
    assert_eq!(
        r0.slots,
        vec![
            e(0, 1, 0, 1),
            e(1, 0, 0, 0),
            pad.clone(),
            pad.clone(),
            e(0, 0, 1, 0),
            e(1, 0, 1, 1),
            pad.clone(),
            pad.clone()
        ]
    );
    let r1 = plan.rank(1);
    assert_eq!(
        r1.slots,
        vec![
            e(0, 0, 0, 1),
            e(1, 1, 0, 0),
            pad.clone(),
            pad.clone(),
            e(0, 1, 1, 0),
            e(1, 2, 1, 0),
            pad.clone(),
            pad
        ]
    );

    let (x, w) = (tokens(), weights());
    let o = plan.dispatch(0, &dispatch_in(&x, &w, PassDir::Forward), 9);
    let rb = H * 2;
    assert_eq!(row(&o.tokens, rb, 0), tok(0, 1));
    assert_eq!(row(&o.tokens, rb, 1), tok(1, 0));
    assert_eq!(row(&o.tokens, rb, 4), tok(0, 0));
    assert_eq!(
        row(&o.tokens, rb, 5),
        tok(1, 0),
        "a token hitting two experts is copied twice"
    );
    for i in [2, 3, 6, 7] {
        assert!(row(&o.tokens, rb, i).iter().all(|&b| b == 0), "padding row {i} is zero");
    }
    assert!(row(&o.tokens, rb, 8).iter().all(|&b| b == P));
    assert!(o.topk_idx.is_empty());
    let bits: Vec<u32> = o.topk_weights.iter().map(|x| x.to_bits()).collect();
    let want: Vec<u32> = [0.75f32, 0.1, 0.0, 0.0, 0.5, 0.2, 0.0, 0.0]
        .iter()
        .map(|x| x.to_bits())
        .chain([pw().to_bits()])
        .collect();
    assert_eq!(bits, want);
    let bwd = plan.dispatch(0, &dispatch_in(&x, &[], PassDir::Backward), 9);
    assert_eq!(bwd.tokens, o.tokens);
    assert!(bwd.topk_weights.is_empty());
}

// ---- QUANT_FWD ("scales forwarded"): raw token rows and their scale rows move together -------

/// Rank r's raw rows: token t is 16 bytes of 0x40 + 16r + t (an e4m3 row of H = 16), its scale
/// row 32 bytes of 0x80 + 16r + t (32 UE8M0 scales).
fn q_rows(bytes: usize, base: u8) -> Vec<Vec<u8>> {
    (0..2)
        .map(|r| {
            (0..3)
                .flat_map(|t| vec![base + 16 * r as u8 + t as u8; bytes])
                .collect()
        })
        .collect()
}

fn q_in<'a>(x: &'a [Vec<u8>], sc: &'a [Vec<u8>], w: &'a [Vec<f32>], pass: PassDir) -> HtQuantFwdIn<'a> {
    HtQuantFwdIn {
        token_row_bytes: 16,
        scale_row_bytes: 32,
        pass,
        recv_kind: ExpertIdKind::Local,
        tokens: x,
        scales: sc,
        weights: w,
        poison: P,
    }
}

#[test]
fn quant_fwd_flat_moves_scales_with_their_tokens() {
    let plan = HtPlan::new(flat_cfg(5), &routing()).unwrap();
    let (x, sc, w) = (q_rows(16, 0x40), q_rows(32, 0x80), weights());
    let o = plan.dispatch_quant_fwd(0, &q_in(&x, &sc, &w, PassDir::Forward), 6);
    // Rank 0 receives (0, t0), (0, t1), (1, t0) (flat_forward_dispatch).
    for (i, (r, t)) in [(0u8, 0u8), (0, 1), (1, 0)].into_iter().enumerate() {
        assert_eq!(row(&o.tokens, 16, i), &[0x40 + 16 * r + t; 16][..], "token row {i}");
        assert_eq!(row(&o.scales, 32, i), &[0x80 + 16 * r + t; 32][..], "scale row {i}");
    }
    for i in 3..6 {
        assert!(
            row(&o.tokens, 16, i).iter().all(|&b| b == P),
            "token row {i} not written"
        );
        assert!(
            row(&o.scales, 32, i).iter().all(|&b| b == P),
            "scale row {i} not written"
        );
    }
    // The recipe leaves the top-k outputs as they are.
    let bf = plan.dispatch(
        0,
        &HtDispatchIn {
            dtype: HtDtype::Bf16,
            hidden: 8,
            pass: PassDir::Forward,
            recv_kind: ExpertIdKind::Local,
            tokens: &x,
            weights: &w,
            poison: P,
        },
        6,
    );
    assert_eq!((o.topk_idx.clone(), o.tokens.clone()), (bf.topk_idx, bf.tokens));
    assert_eq!(o.topk_idx, vec![1, -1, 0, -1, 0, 1, -1, -1, -1, -1, pi(), pi()]);
    // Backward: same rows, no top-k outputs.
    let b = plan.dispatch_quant_fwd(0, &q_in(&x, &sc, &[], PassDir::Backward), 6);
    assert_eq!((b.tokens, b.scales), (o.tokens, o.scales));
    assert!(b.topk_idx.is_empty() && b.topk_weights.is_empty());
}

#[test]
fn quant_fwd_expert_major_permutes_scales_like_tokens() {
    let plan = HtPlan::new(em_cfg(4, 8), &routing()).unwrap();
    let (x, sc, w) = (q_rows(16, 0x40), q_rows(32, 0x80), weights());
    let o = plan.dispatch_quant_fwd(0, &q_in(&x, &sc, &w, PassDir::Forward), 9);
    // Rank 0's slots (em_metadata_padding_and_dispatch): (0,1) (1,0) pad pad (0,0) (1,0) pad pad.
    let src = [
        Some((0u8, 1u8)),
        Some((1, 0)),
        None,
        None,
        Some((0, 0)),
        Some((1, 0)),
        None,
        None,
    ];
    for (i, s) in src.into_iter().enumerate() {
        let (tw, sw) = match s {
            Some((r, t)) => ([0x40 + 16 * r + t; 16], [0x80 + 16 * r + t; 32]),
            None => ([0; 16], [0; 32]),
        };
        assert_eq!(row(&o.tokens, 16, i), &tw[..], "token row {i}");
        assert_eq!(row(&o.scales, 32, i), &sw[..], "scale row {i} (padding rows are zero)");
    }
    assert!(row(&o.scales, 32, 8).iter().all(|&b| b == P));
    assert_eq!(o.topk_weights.len(), 9);
    let b = plan.dispatch_quant_fwd(0, &q_in(&x, &sc, &[], PassDir::Backward), 9);
    assert_eq!((b.tokens, b.scales), (o.tokens, o.scales));
}

#[test]
fn quant_fwd_rows_are_any_bytes_on_random_routings() {
    // dispatch_rows against an independent statement: each received row is the source's row,
    // for widths and bit patterns the HT token types never have (NaN encodings, packed FP4).
    let mut rng = SplitMix64::new(0x9f0d);
    for i in 0..40 {
        let layout = if i % 2 == 0 { Layout::Flat } else { Layout::ExpertMajor };
        let shape = LlShape {
            nranks: 1 + i % 4,
            num_experts: (1 + i % 4) * 4,
            max_tokens: 33,
            hidden: 16,
            topk: (1 + i % 5).min(4),
        };
        let routing: Vec<Vec<i64>> = (0..shape.nranks)
            .map(|_| {
                let t = rng.below(shape.max_tokens + 1);
                gen_routing(&mut rng, shape, t, Routing::Uniform)
            })
            .collect();
        let cfg = HtConfig {
            nranks: shape.nranks,
            num_experts: shape.num_experts,
            topk: shape.topk,
            layout,
            alignment: if layout == Layout::Flat { 1 } else { 1 << (i % 3) },
            budget: 0,
            policy: OverflowPolicy::Trap,
        };
        let plan = HtPlan::new(cfg, &routing).unwrap();
        let rb = 16 * (1 + i % 3);
        let rows: Vec<Vec<u8>> = (0..shape.nranks)
            .map(|r| random_bytes(&mut rng, plan.num_tokens(r) * rb))
            .collect();
        for d in 0..shape.nranks {
            let count = plan.rank(d).count;
            let out = plan.dispatch_rows(d, &rows, rb, count + 2, P);
            for (j, slot) in plan.rank(d).slots.iter().enumerate() {
                let want: Vec<u8> = match *slot {
                    HtSlot::Token {
                        src_rank, src_token, ..
                    }
                    | HtSlot::Expert {
                        src_rank, src_token, ..
                    } => rows[src_rank][src_token * rb..(src_token + 1) * rb].to_vec(),
                    HtSlot::Padding => vec![0; rb],
                };
                assert_eq!(row(&out, rb, j), &want[..], "case {i} rank {d} row {j}");
            }
            assert!(out[count * rb..].iter().all(|&b| b == P));
        }
    }
    // random_bytes: the requested length, not all one value.
    let v = random_bytes(&mut rng, 37);
    assert_eq!(v.len(), 37);
    assert!(v.iter().any(|&b| b != v[0]));
}

#[test]
fn em_combine_forward_and_backward() {
    let plan = HtPlan::new(em_cfg(4, 8), &routing()).unwrap();
    let x = combine_x([8, 8]);
    let g: Vec<Vec<f32>> = (0..2).map(|d| (0..8).map(|i| (100 * d + i) as f32).collect()).collect();
    let out = combine_f32(&plan, &x, PassDir::Backward, &g);
    let r0: Vec<f32> = [line(140.0, 2.0), line(140.0, 2.0), line(0.0, 0.0)].concat();
    assert_eq!(out[0].0, r0);
    let r1: Vec<f32> = [line(60.0, 2.0), line(110.0, 1.0), line(150.0, 1.0)].concat();
    assert_eq!(out[1].0, r1);
    assert_eq!(out[0].1, vec![4.0, 100.0, 104.0, 0.0, 0.0, 0.0]);
    assert_eq!(out[1].1, vec![1.0, 5.0, 101.0, 101.0, 105.0, 0.0]);
}

#[test]
fn em_zero_count_experts_get_no_zone() {
    // N=1, E=4, K=1: experts 2, 2, 0 → l0: 1 row (pad 2), l1: none, l2: 2 rows, l3: none.
    let cfg = HtConfig {
        nranks: 1,
        num_experts: 4,
        topk: 1,
        layout: Layout::ExpertMajor,
        alignment: 2,
        budget: 0,
        policy: OverflowPolicy::Trap,
    };
    let plan = HtPlan::new(cfg, &[vec![2, 2, 0]]).unwrap();
    let r = plan.rank(0);
    assert_eq!(r.expert_counters, vec![2, 0, 2, 0]);
    assert_eq!(r.expert_offsets, vec![0, 2, 2, 4]);
    assert_eq!((r.recv_total, r.count), (4, 4));
    assert_eq!(r.slots[1], HtSlot::Padding);
}

// ---- budget: DROP, TRAP, capture, eager --------------------------------------------------------

#[test]
fn flat_drop_keeps_the_first_s_rows() {
    let cfg = HtConfig {
        policy: OverflowPolicy::Drop,
        ..flat_cfg(3)
    };
    let plan = HtPlan::new(cfg, &routing()).unwrap();
    let r1 = plan.rank(1);
    assert_eq!(
        (r1.recv_total, r1.count, r1.dropped),
        (4, 3, 1),
        "recv_total is pre-drop"
    );
    assert_eq!(r1.expert_counters, vec![2, 1], "FLAT counters count the rows held");
    assert_eq!(r1.expert_pairs, vec![2, 2]);
    assert_eq!(plan.sends(1, 2)[0].slot, None);
    assert!(!plan.async_error);
    let x = combine_x([3, 3]);
    let g: Vec<Vec<f32>> = (0..2)
        .map(|d| (0..3 * K).map(|i| (100 * d + i) as f32).collect())
        .collect();
    let out = combine_f32(&plan, &x, PassDir::Backward, &g);
    assert_eq!(&out[1].0[2 * H..], line(0.0, 0.0), "the dropped token's sum is empty");
    assert_eq!(&out[1].1[4..], &[0.0, 0.0], "its gradient is 0");
    // Forward outputs: 3 rows, no reset rows left.
    let (xt, w) = (tokens(), weights());
    let o = plan.dispatch(1, &dispatch_in(&xt, &w, PassDir::Forward), 3);
    assert_eq!(o.topk_idx, vec![0, -1, 1, -1, 0, -1]);
}

#[test]
fn trap_fails_and_capture_drops_with_the_flag() {
    let err = HtPlan::new(flat_cfg(3), &routing()).unwrap_err();
    assert_eq!(
        err,
        HtPlanError::Overflow {
            rank: 1,
            count: 4,
            budget: 3
        }
    );
    let e = err.to_error();
    assert_eq!(e.code(), 5);
    assert!(
        e.msg.contains("rank 1") && e.msg.contains("4 rows") && e.msg.contains("DROP"),
        "{}",
        e.msg
    );
    // The lowest rank is named when several overflow.
    let err = HtPlan::new(em_cfg(4, 3), &routing()).unwrap_err();
    assert_eq!(
        err,
        HtPlanError::Overflow {
            rank: 0,
            count: 8,
            budget: 3
        }
    );
    let cap = HtPlan::captured(flat_cfg(3), &routing());
    assert!(cap.async_error);
    let drop = HtPlan::new(
        HtConfig {
            policy: OverflowPolicy::Drop,
            ..flat_cfg(3)
        },
        &routing(),
    )
    .unwrap();
    for d in 0..2 {
        assert_eq!(cap.rank(d), drop.rank(d));
    }
}

#[test]
fn em_drop_clamps_counters_and_offsets() {
    // S = 4: expert 1's zone starts at S on both ranks, so it is empty and its rows are dropped.
    let cfg = HtConfig {
        policy: OverflowPolicy::Drop,
        ..em_cfg(4, 4)
    };
    let plan = HtPlan::new(cfg, &routing()).unwrap();
    let r0 = plan.rank(0);
    assert_eq!((r0.recv_total, r0.count, r0.dropped), (8, 4, 2));
    assert_eq!(r0.expert_counters, vec![4, 0]);
    assert_eq!(r0.expert_offsets, vec![0, 4]);
    let x = combine_x([4, 4]);
    let out = combine_f32(&plan, &x, PassDir::Forward, &[]);
    assert_eq!(
        &out[0].0[..H],
        line(100.0, 1.0),
        "token 0 keeps only its rank-1 contribution"
    );

    // A zone past S: N=1, E=3, K=1, A=4; l0: 5 rows (pad 8), l1: 1 (at 8), l2: 1 (at 12); S=7.
    let cfg = HtConfig {
        nranks: 1,
        num_experts: 3,
        topk: 1,
        layout: Layout::ExpertMajor,
        alignment: 4,
        budget: 7,
        policy: OverflowPolicy::Drop,
    };
    let plan = HtPlan::new(cfg, &[vec![0, 0, 0, 0, 0, 1, 2]]).unwrap();
    let r = plan.rank(0);
    assert_eq!((r.recv_total, r.count, r.dropped), (16, 7, 2));
    assert_eq!(r.expert_counters, vec![7, 0, 0], "the room left");
    assert_eq!(r.expert_offsets, vec![0, 7, 7], "zones past S sit at S");
    assert_eq!(r.zone_offsets, vec![0, 8, 12]);
    assert_eq!(&r.slots[5..], &[HtSlot::Padding, HtSlot::Padding]);
    let x = vec![HtDtype::F32.encode(&(0..7 * 8).map(|i| (i / 8) as f32 + 1.0).collect::<Vec<_>>())];
    let w = vec![vec![0.5f32; 7]];
    let d = plan.dispatch(
        0,
        &HtDispatchIn {
            dtype: HtDtype::F32,
            hidden: 8,
            pass: PassDir::Forward,
            recv_kind: ExpertIdKind::Local,
            tokens: &x,
            weights: &w,
            poison: P,
        },
        7,
    );
    assert_eq!(d.topk_weights, vec![0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]);
    assert_eq!(HtDtype::F32.decode(&d.tokens)[5 * 8..], [0.0; 16]);
}

#[test]
fn eager_mode_has_no_cap_and_no_reset_rows() {
    let plan = HtPlan::new(flat_cfg(0), &routing()).unwrap();
    assert_eq!((plan.rank(0).count, plan.rank(1).count), (3, 4));
    let (x, w) = (tokens(), weights());
    let o = plan.dispatch(0, &dispatch_in(&x, &w, PassDir::Forward), 4);
    assert_eq!(&o.topk_idx[6..], &[pi(), pi()], "eager: rows past count are left alone");
    let o = plan.dispatch(0, &dispatch_in(&x, &w, PassDir::Forward), 3);
    assert_eq!(o.tokens.len(), 3 * H * 2);
    // EM eager: no cap even with a large padded total.
    let plan = HtPlan::new(em_cfg(64, 0), &routing()).unwrap();
    assert_eq!(
        (plan.rank(0).count, plan.rank(0).expert_offsets.clone()),
        (128, vec![0, 64])
    );
}

// ---- combine arithmetic ------------------------------------------------------------------------

/// N=3, E=3, K=3: every token goes to every rank once, so FLAT combine adds rank 0, 1, 2's rows.
fn three_way(dt: HtDtype, vals: [f32; 3]) -> Vec<f32> {
    let cfg = HtConfig {
        nranks: 3,
        num_experts: 3,
        topk: 3,
        layout: Layout::Flat,
        alignment: 0,
        budget: 0,
        policy: OverflowPolicy::Trap,
    };
    let plan = HtPlan::new(cfg, &[vec![2, 1, 0], vec![], vec![]]).unwrap();
    let x: Vec<Vec<u8>> = vals.iter().map(|&v| dt.encode(&[v; 8])).collect();
    let o = plan.combine(
        0,
        &HtCombineIn {
            dtype: dt,
            hidden: 8,
            pass: PassDir::Forward,
            tokens: &x,
            weights: &[],
        },
    );
    dt.decode(&o.tokens)
}

#[test]
fn combine_adds_in_rank_order_in_f32_and_rounds_once() {
    // f32: (2^24 + 1) − 2^24 = 0 in rank order (the 1 is lost), 1 in any order that adds the
    // big values first.
    let big = 2f32.powi(24);
    assert_eq!(three_way(HtDtype::F32, [big, 1.0, -big]), [0.0; 8]);
    assert_eq!(three_way(HtDtype::F32, [big, -big, 1.0]), [1.0; 8]);
    // bf16: 1 + 2^-8 + 2^-8 = 1 + 2^-7 exactly in f32, one rounding keeps it (rounding after
    // each add would give 1.0 twice).
    let e = 2f32.powi(-8);
    assert_eq!(three_way(HtDtype::Bf16, [1.0, e, e]), [1.0 + 2.0 * e; 8]);
    // fp16: 1 + 2^-11 + 2^-11 = 1 + 2^-10.
    let e = 2f32.powi(-11);
    assert_eq!(three_way(HtDtype::F16, [1.0, e, e]), [1.0 + 2.0 * e; 8]);
    // The accumulator starts at +0.0: −0.0 alone comes back +0.0.
    assert_eq!(three_way(HtDtype::F32, [-0.0, -0.0, -0.0])[0].to_bits(), 0);
}

#[test]
fn em_combine_order_is_rank_then_local_expert() {
    // N=2, E=4 (L=2), K=3; one token of rank 0 → experts 3, 0, 1 (rank 1 l1, rank 0 l0, l1).
    // Combine order: (rank 0, l0), (rank 0, l1), (rank 1, l1) whatever the k order.
    let cfg = HtConfig {
        nranks: 2,
        num_experts: 4,
        topk: 3,
        layout: Layout::ExpertMajor,
        alignment: 0,
        budget: 0,
        policy: OverflowPolicy::Trap,
    };
    let plan = HtPlan::new(cfg, &[vec![3, 0, 1], vec![]]).unwrap();
    let big = 2f32.powi(24);
    let x = vec![HtDtype::F32.encode(&[big, 1.0]), HtDtype::F32.encode(&[-big])];
    let o = plan.combine(
        0,
        &HtCombineIn {
            dtype: HtDtype::F32,
            hidden: 1,
            pass: PassDir::Forward,
            tokens: &x,
            weights: &[],
        },
    );
    assert_eq!(HtDtype::F32.decode(&o.tokens), [0.0]);
    let locals: Vec<(usize, Option<usize>)> = plan.sends(0, 0).iter().map(|s| (s.rank, s.local)).collect();
    assert_eq!(locals, vec![(0, Some(0)), (0, Some(1)), (1, Some(1))]);
}

// ---- random routings: docs/HT.md restated -------------------------------------------------------

struct Case {
    cfg: HtConfig,
    routing: Vec<Vec<i64>>,
}

fn random_case(rng: &mut SplitMix64, i: usize) -> Case {
    let nranks = [1, 2, 3, 4, 8][rng.below(5)];
    let l = [1, 2, 3, 4, 8][rng.below(5)];
    let num_experts = nranks * l;
    let topk = 1 + rng.below(num_experts.min(6));
    let b = 1 + rng.below(12);
    let shape = LlShape {
        nranks,
        num_experts,
        max_tokens: b,
        hidden: 8,
        topk,
    };
    let kind = match i % 3 {
        0 => Routing::Uniform,
        1 => Routing::Skewed {
            rank: rng.below(nranks),
        },
        _ => Routing::SameRankDups,
    };
    let routing = (0..nranks)
        .map(|_| {
            let t = rng.below(b + 1);
            if matches!(kind, Routing::SameRankDups) && topk < 2 {
                gen_routing(rng, shape, t, Routing::Uniform)
            } else {
                gen_routing(rng, shape, t, kind)
            }
        })
        .collect();
    let budget = match rng.below(3) {
        0 => 0,
        1 => b + rng.below(nranks * b * topk + 1),
        _ => 1 + rng.below(2 * b),
    };
    let cfg = HtConfig {
        nranks,
        num_experts,
        topk,
        layout: if rng.one_in(2) {
            Layout::Flat
        } else {
            Layout::ExpertMajor
        },
        alignment: [0, 1, 2, 4, 8][rng.below(5)],
        budget,
        policy: if rng.one_in(2) {
            OverflowPolicy::Trap
        } else {
            OverflowPolicy::Drop
        },
    };
    Case { cfg, routing }
}

/// Distinct experts of a row, each with its first k.
fn distinct(row: &[i64]) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = Vec::new();
    for (k, &e) in row.iter().enumerate() {
        if e >= 0 && !v.iter().any(|&(x, _)| x == e as usize) {
            v.push((e as usize, k));
        }
    }
    v
}

/// What each rank would receive with no budget, restated: FLAT (s, t) pairs; EM per local expert.
type Rows = (Vec<(usize, usize)>, Vec<Vec<(usize, usize)>>);

fn expected_rows(c: &Case, d: usize) -> Rows {
    let (k, l_n) = (c.cfg.topk, c.cfg.local_experts());
    let mut flat = Vec::new();
    let mut zones = vec![Vec::new(); l_n];
    for (s, rt) in c.routing.iter().enumerate() {
        for (t, row) in rt.chunks(k).enumerate() {
            let here: Vec<usize> = distinct(row).iter().map(|&(e, _)| e).filter(|e| e / l_n == d).collect();
            if !here.is_empty() {
                flat.push((s, t));
            }
            for e in here {
                zones[e % l_n].push((s, t));
            }
        }
    }
    (flat, zones)
}

/// Checks one case; returns (overflowed, dropped rows anywhere, padding rows anywhere).
#[allow(clippy::needless_range_loop)] // ranks and slots index several tables at once
fn check_case(c: &Case, rng: &mut SplitMix64) -> (bool, bool, bool) {
    let cfg = c.cfg;
    let (n, k, l_n) = (cfg.nranks, cfg.topk, cfg.local_experts());
    let cap = if cfg.budget == 0 { usize::MAX } else { cfg.budget };
    let totals: Vec<usize> = (0..n)
        .map(|d| {
            let (flat, zones) = expected_rows(c, d);
            match cfg.layout {
                Layout::Flat => flat.len(),
                _ => zones.iter().map(|z| cfg.pad(z.len())).sum(),
            }
        })
        .collect();
    let over = (0..n).find(|&d| totals[d] > cap);
    let plan = match (HtPlan::new(cfg, &c.routing), over, cfg.policy) {
        (Err(e), Some(d), OverflowPolicy::Trap) => {
            assert_eq!(
                e,
                HtPlanError::Overflow {
                    rank: d,
                    count: totals[d],
                    budget: cfg.budget
                }
            );
            let p = HtPlan::captured(cfg, &c.routing);
            assert!(p.async_error);
            p
        }
        (Ok(p), None, _) | (Ok(p), Some(_), OverflowPolicy::Drop) => p,
        (r, o, pol) => panic!("{cfg:?}: got {:?} with overflow {o:?} and {pol:?}", r.err()),
    };

    for d in 0..n {
        let m = plan.rank(d);
        assert_eq!(m.recv_total, totals[d]);
        assert_eq!(m.count, totals[d].min(cap));
        assert_eq!(m.slots.len(), m.count);
        let (flat, zones) = expected_rows(c, d);
        match cfg.layout {
            Layout::Flat => {
                let got: Vec<(usize, usize)> = m
                    .slots
                    .iter()
                    .map(|s| match s {
                        HtSlot::Token {
                            src_rank, src_token, ..
                        } => (*src_rank, *src_token),
                        _ => panic!("FLAT rows are tokens"),
                    })
                    .collect();
                assert_eq!(
                    got,
                    flat[..m.count],
                    "rank {d}: FLAT rows in (source, token) order, first S kept"
                );
                let mut counters = vec![0; l_n];
                for s in &m.slots {
                    let HtSlot::Token {
                        src_rank,
                        src_token,
                        experts,
                    } = s
                    else {
                        unreachable!()
                    };
                    let row = &c.routing[*src_rank][src_token * k..(src_token + 1) * k];
                    let mut want: Vec<(usize, usize)> = distinct(row)
                        .into_iter()
                        .filter(|&(e, _)| e / l_n == d)
                        .map(|(e, kk)| (e % l_n, kk))
                        .collect();
                    want.sort();
                    assert_eq!(experts, &want);
                    for &(l, _) in experts {
                        counters[l] += 1;
                    }
                }
                assert_eq!(m.expert_counters, counters);
                assert_eq!(m.dropped, flat.len() - m.count);
            }
            _ => {
                // Zones: consecutive, in expert order, each padded; rows (source, token) ordered.
                let mut off = 0;
                let mut kept_data = 0;
                let mut seen = vec![false; m.count];
                for (l, z) in zones.iter().enumerate() {
                    assert_eq!(m.zone_offsets[l], off);
                    assert_eq!(m.expert_offsets[l], off.min(cap));
                    assert_eq!(m.expert_counters[l], cfg.pad(z.len()).min(cap - off.min(cap)));
                    for (j, &(s, t)) in z.iter().enumerate() {
                        let slot = off + j;
                        if slot < cap {
                            kept_data += 1;
                            let HtSlot::Expert {
                                src_rank,
                                src_token,
                                local,
                                k: kk,
                            } = m.slots[slot]
                            else {
                                panic!("rank {d} slot {slot} should be data")
                            };
                            assert_eq!((src_rank, src_token, local), (s, t, l));
                            assert_eq!(c.routing[s][t * k + kk], (d * l_n + l) as i64);
                            assert!(
                                c.routing[s][t * k..t * k + kk]
                                    .iter()
                                    .all(|&e| e != (d * l_n + l) as i64)
                            );
                            assert!(!seen[slot]);
                            seen[slot] = true;
                        }
                    }
                    for slot in off + z.len()..(off + cfg.pad(z.len())).min(m.count) {
                        assert_eq!(m.slots[slot], HtSlot::Padding, "rank {d} slot {slot}");
                        assert!(!seen[slot]);
                        seen[slot] = true;
                    }
                    off += cfg.pad(z.len());
                }
                assert!(seen.iter().all(|&x| x), "every row is data or padding of one zone");
                assert_eq!(m.expert_counters.iter().sum::<usize>(), m.count);
                assert_eq!(m.dropped, zones.iter().map(Vec::len).sum::<usize>() - kept_data);
            }
        }
    }

    // Sends are the inverse of the slots: every (token, destination) exactly once.
    for s in 0..n {
        for t in 0..plan.num_tokens(s) {
            let row = &c.routing[s][t * k..(t + 1) * k];
            let mut want: Vec<(usize, Option<usize>)> = distinct(row)
                .iter()
                .map(|&(e, _)| match cfg.layout {
                    Layout::Flat => (e / l_n, None),
                    _ => (e / l_n, Some(e % l_n)),
                })
                .collect();
            want.sort();
            want.dedup();
            let got: Vec<(usize, Option<usize>)> = plan.sends(s, t).iter().map(|x| (x.rank, x.local)).collect();
            assert_eq!(got, want, "token ({s}, {t})");
            for x in plan.sends(s, t) {
                if let Some(slot) = x.slot {
                    let (sr, st) = match &plan.rank(x.rank).slots[slot] {
                        HtSlot::Token {
                            src_rank, src_token, ..
                        } => (*src_rank, *src_token),
                        HtSlot::Expert {
                            src_rank,
                            src_token,
                            local,
                            ..
                        } => {
                            assert_eq!(Some(*local), x.local);
                            (*src_rank, *src_token)
                        }
                        HtSlot::Padding => panic!("a send into padding"),
                    };
                    assert_eq!((sr, st), (s, t));
                }
            }
        }
    }

    // Round trip: dispatch small integers, combine the dispatched rows back: each token comes
    // back times the number of its destinations that kept it (exact in every type).
    let h = 8;
    let dt = HtDtype::ALL[rng.below(3)];
    let x: Vec<Vec<u8>> = (0..n)
        .map(|s| {
            let v: Vec<f32> = (0..plan.num_tokens(s) * h)
                .map(|_| rng.below(17) as f32 - 8.0)
                .collect();
            dt.encode(&v)
        })
        .collect();
    let w: Vec<Vec<f32>> = (0..n)
        .map(|s| (0..plan.num_tokens(s) * k).map(|_| rng.unit_f32()).collect())
        .collect();
    let inp = HtDispatchIn {
        dtype: dt,
        hidden: h,
        pass: PassDir::Forward,
        recv_kind: ExpertIdKind::Local,
        tokens: &x,
        weights: &w,
        poison: P,
    };
    let outs = plan.dispatch_all(&inp);
    let recv: Vec<Vec<u8>> = outs.iter().map(|o| o.tokens.clone()).collect();
    let g: Vec<Vec<f32>> = outs.iter().map(|o| o.topk_weights.clone()).collect();
    let back = plan.combine_all(&HtCombineIn {
        dtype: dt,
        hidden: h,
        pass: PassDir::Backward,
        tokens: &recv,
        weights: &g,
    });
    for s in 0..n {
        let xs = dt.decode(&x[s]);
        let ys = dt.decode(&back[s].tokens);
        for t in 0..plan.num_tokens(s) {
            let kept = plan.sends(s, t).iter().filter(|x| x.slot.is_some()).count() as f32;
            for i in 0..h {
                assert_eq!(ys[t * h + i], kept * xs[t * h + i], "rank {s} token {t}");
            }
            // Backward weights: the forward weight of each k's expert (first occurrence), where
            // kept; 0.0 for −1 and dropped rows.
            let row = &c.routing[s][t * k..(t + 1) * k];
            for kk in 0..k {
                let e = row[kk];
                let want = if e < 0 {
                    0.0
                } else {
                    let first = row.iter().position(|&x| x == e).unwrap();
                    let (d, l) = (e as usize / l_n, e as usize % l_n);
                    match plan.slot_of(s, t, d, l) {
                        Some(_) => w[s][t * k + first],
                        None => 0.0,
                    }
                };
                assert_eq!(back[s].topk_weights[t * k + kk], want, "rank {s} token {t} k {kk}");
            }
        }
    }
    // Dispatch outputs: FLAT idx rows list ascending experts; reset rows; EM padding weights 0.
    for (d, o) in outs.iter().enumerate() {
        let m = plan.rank(d);
        let rows = m.count.max(cfg.budget);
        match cfg.layout {
            Layout::Flat => {
                assert_eq!(o.topk_idx.len(), rows * k);
                for (i, s) in m.slots.iter().enumerate() {
                    let HtSlot::Token { experts, .. } = s else {
                        unreachable!()
                    };
                    let ids = &o.topk_idx[i * k..(i + 1) * k];
                    assert!(ids[..experts.len()].windows(2).all(|p| p[0] < p[1]));
                    assert!(ids[experts.len()..].iter().all(|&x| x == -1));
                    assert!(
                        o.topk_weights[i * k + experts.len()..(i + 1) * k]
                            .iter()
                            .all(|&x| x == 0.0)
                    );
                }
                assert!(o.topk_idx[m.count * k..].iter().all(|&x| x == -1));
            }
            _ => {
                for (i, s) in m.slots.iter().enumerate() {
                    if *s == HtSlot::Padding {
                        assert_eq!(o.topk_weights[i], 0.0);
                        assert!(
                            o.tokens[i * h * dt.bytes()..(i + 1) * h * dt.bytes()]
                                .iter()
                                .all(|&b| b == 0)
                        );
                    }
                }
                assert!(o.topk_weights[m.count..].iter().all(|&x| x == 0.0));
            }
        }
    }
    let ms: Vec<&HtRankMeta> = (0..n).map(|d| plan.rank(d)).collect();
    (
        over.is_some(),
        ms.iter().any(|m| m.dropped > 0),
        ms.iter().any(|m| m.slots.contains(&HtSlot::Padding)),
    )
}

#[test]
fn random_routings_follow_the_rules() {
    let mut rng = SplitMix64::new(0x4854);
    let mut seen = [0usize; 3];
    for i in 0..600 {
        let c = random_case(&mut rng, i);
        let (o, d, p) = check_case(&c, &mut rng);
        for (n, x) in seen.iter_mut().zip([o, d, p]) {
            *n += x as usize;
        }
    }
    // The generator reaches every regime often.
    assert!(seen.iter().all(|&n| n >= 50), "overflow, drops, padding: {seen:?}");
}

#[test]
fn random_tokens_are_in_range() {
    let mut rng = SplitMix64::new(1);
    for dt in HtDtype::ALL {
        let v = dt.decode(&random_tokens(&mut rng, dt, 5, 16));
        assert_eq!(v.len(), 80);
        assert!(v.iter().all(|x| (-4.0..=4.0).contains(x)));
    }
}
