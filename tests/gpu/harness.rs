//! GPU test harness: device buffers, tensor descriptors, streams, and one low-latency round
//! (dispatch then combine) on a set of groups, checked against the CPU reference.

#![allow(dead_code)]

use cudarc::driver::sys;
use ep_core::enums::{DType, ExpertIdKind, Layout, dtype};
use ep_reference::ll::*;
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::ops::{ncclEpCombine, ncclEpComplete, ncclEpDispatch};
use nccl_ep::abi::types::*;
use nccl_ep::cuda::context::CtxGuard;
use nccl_ep::cuda::memory::{self, DeviceMem};
use std::ffi::{CStr, c_void};

pub const POISON_TOKEN: u16 = 0x7fa5; // a NaN pattern no computation produces
pub const POISON_WEIGHT: f32 = -12345.5;
pub const POISON_INT: i32 = -777;

/// The token types of the LL tests (bits; `u16` is bf16): what outputs are poisoned with, and
/// how a combined row is compared with the reference.
pub trait TestToken: TokenElem {
    /// A NaN pattern no computation produces.
    fn poison() -> Self;
    /// Combined rows against the reference.
    fn compare_combined(what: &str, got: &[Self], want: &[Self]) -> Result<(), String> {
        compare(what, got, want)
    }
}

impl TestToken for u16 {
    fn poison() -> u16 {
        POISON_TOKEN
    }
    /// bf16 keeps the 1-ulp allowance the bf16 suites were written with.
    fn compare_combined(what: &str, got: &[u16], want: &[u16]) -> Result<(), String> {
        compare_bf16_close(what, got, want)
    }
}

/// fp16 and fp32 combine outputs must match the reference bit for bit.
impl TestToken for Fp16 {
    fn poison() -> Fp16 {
        Fp16(0x7ea5)
    }
}

impl TestToken for Fp32 {
    fn poison() -> Fp32 {
        Fp32(0x7fa5_a5a5)
    }
}

pub fn last_error() -> String {
    // SAFETY: the extension returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(nccl_ep::abi::ext::ncclEpxGetLastError()) }
        .to_string_lossy()
        .into_owned()
}

/// Fails with the library's message when a call does not return ncclSuccess. The argument is
/// the call in the caller's own `unsafe { .. }` block, so that each call site carries the
/// `// SAFETY:` comment for its own pointers.
#[macro_export]
macro_rules! ep_ok {
    ($call:expr) => {{
        let r = $call;
        if r != 0 {
            return Err(format!(
                "{} returned {}: {}",
                stringify!($call),
                r,
                $crate::harness::last_error()
            ));
        }
    }};
}

pub fn cu(r: sys::CUresult, what: &str) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// Why no CUDA device can be used here, or None when one can.
pub fn no_gpu_reason() -> Option<String> {
    match nccl_ep::cuda::driver::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver sees no device".into()),
        Err(e) => Some(e.msg),
    }
}

/// The first line of every GPU test. GPU tests are `#[ignore]`d, so that cargo counts them as
/// ignored (not passed) on a machine without a GPU; once asked for (`--ignored`,
/// `--include-ignored`) they must run, so this FAILS without a device rather than skip.
/// The guard it returns makes the GPU tests of one test binary run one at a time even without
/// `--test-threads=1` (the mask and timeout tests time their peers; two tests sharing the GPU
/// would make them flaky). Keep it alive for the whole test: `let _gpu = require_gpu();`.
pub fn require_gpu() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that panicked while holding it poisons it; the next test may still run.
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(why) = no_gpu_reason() {
        panic!(
            "this test needs an NVIDIA GPU and none is usable here ({why}); it is #[ignore]d \
             for that reason: run it on a GPU machine (docs/BUILDING.md, \"GPU tests\")"
        );
    }
    guard
}

pub struct Stream(pub sys::CUstream);

impl Stream {
    pub fn new(device: i32) -> Result<Stream, String> {
        let _g = CtxGuard::enter(device).map_err(|e| e.msg)?;
        let mut s: sys::CUstream = std::ptr::null_mut();
        cu(
            // SAFETY: entering the context loaded the driver and made the device's primary
            // context current; the call writes one handle to the live local `s`.
            unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(Stream(s))
    }
    pub fn raw(&self) -> cudaStream_t {
        self.0.cast()
    }
    pub fn sync(&self) -> Result<(), String> {
        // SAFETY: `self.0` was created by `Stream::new` and is destroyed only when `self` drops,
        // so it is a valid stream for this call.
        memory::stream_synchronize(unsafe { memory::Stream::from_raw(self.0.cast()) }).map_err(|e| e.msg)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: `self.0` was created by `Stream::new` (which loaded the driver) and is destroyed
        // only here, once; work still queued on it completes before the driver releases it.
        unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// A device array plus its tensor descriptor (the descriptor points into this struct).
pub struct DevTensor {
    pub mem: DeviceMem,
    pub sizes: Box<[usize]>,
    pub desc: Box<ncclEpTensor_t>,
    pub bytes: usize,
}

impl DevTensor {
    pub fn new(device: i32, dt: DType, sizes: &[usize]) -> Result<DevTensor, String> {
        let elem = dt.elem_bytes();
        let bytes = sizes.iter().product::<usize>() * elem;
        let mem = DeviceMem::alloc(device, bytes.max(16)).map_err(|e| e.msg)?;
        let mut sizes: Box<[usize]> = sizes.into();
        let desc = Box::new(ncclEpTensor_t {
            size: 48,
            magic: 0xCAFE_CAFE,
            ndim: sizes.len() as u32,
            datatype: dt.raw(),
            data: mem.ptr() as *mut c_void,
            win_hdl: std::ptr::null_mut(),
            win_offset: 0,
            sizes: sizes.as_mut_ptr(),
        });
        Ok(DevTensor {
            mem,
            sizes,
            desc,
            bytes,
        })
    }
    pub fn ptr(&mut self) -> *mut ncclEpTensor_t {
        &mut *self.desc
    }
    pub fn upload<T: Copy>(&self, v: &[T]) -> Result<(), String> {
        assert_eq!(std::mem::size_of_val(v), self.bytes, "upload size");
        if self.bytes == 0 {
            return Ok(());
        }
        let _g = CtxGuard::enter(self.mem.device()).map_err(|e| e.msg)?;
        // SAFETY: `v` holds exactly `self.bytes` bytes (asserted above) and the allocation holds
        // at least that many (`new` allocates them, `reshape` never grows past it); its context
        // is current.
        unsafe { memory::memcpy_htod(self.mem.ptr(), v) }.map_err(|e| e.msg)?;
        // From pageable memory cuMemcpyHtoD may return before its DMA lands, and the ranks'
        // streams are non-blocking: without this wait a late poison (or input) write can land
        // after the operation under test (seen once under GPU contention: a combine output that
        // looked unwritten).
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT).map_err(|e| e.msg)
    }
    pub fn download<T: Copy + Default>(&self) -> Result<Vec<T>, String> {
        let n = self.bytes / std::mem::size_of::<T>();
        let mut v = vec![T::default(); n];
        if n > 0 {
            let _g = CtxGuard::enter(self.mem.device()).map_err(|e| e.msg)?;
            // SAFETY: `v` has `self.bytes / size_of::<T>()` elements, no more than the allocation
            // holds (`self.bytes` never exceeds it), in the context made current above; the
            // tests read back only integers, floats and their bit newtypes, for which every bit
            // pattern is a valid `T`.
            unsafe { memory::memcpy_dtoh(&mut v, self.mem.ptr()) }.map_err(|e| e.msg)?;
        }
        Ok(v)
    }
    /// Fills every element with `v` (outputs are poisoned before each operation).
    pub fn fill<T: Copy>(&self, v: T) -> Result<(), String> {
        let n = self.bytes / std::mem::size_of::<T>();
        self.upload(&vec![v; n])
    }
    /// Fills the current extent with a 32-bit pattern on the legacy stream (no host copy; the
    /// caller synchronises the legacy stream before relying on it).
    pub fn fill32(&self, word: u32) -> Result<(), String> {
        assert!(self.bytes.is_multiple_of(4), "fill32 of {} bytes", self.bytes);
        if self.bytes == 0 {
            return Ok(());
        }
        let _g = CtxGuard::enter(self.mem.device()).map_err(|e| e.msg)?;
        // SAFETY: `self.bytes / 4` words lie within the allocation (`self.bytes` never exceeds
        // it), whose context is current; the allocation outlives the queued fill, since dropping
        // it (cuMemFree) waits for the device first.
        unsafe { memory::memset_d32_async(self.mem.ptr(), word, self.bytes / 4, memory::Stream::LEGACY_DEFAULT) }
            .map_err(|e| e.msg)
    }
    /// New extents (same rank, at most the allocation) and data type; the descriptor follows.
    pub fn reshape(&mut self, dt: DType, sizes: &[usize]) {
        assert_eq!(sizes.len(), self.sizes.len(), "reshape keeps the rank");
        let bytes = sizes.iter().product::<usize>() * dt.elem_bytes();
        assert!(bytes <= self.mem.len().max(16), "reshape past the allocation");
        self.sizes.copy_from_slice(sizes);
        self.desc.datatype = dt.raw();
        self.bytes = bytes;
    }
}

/// Synchronises the legacy stream of device 0 (after `fill32`).
pub fn sync_legacy() -> Result<(), String> {
    let _g = CtxGuard::enter(0).map_err(|e| e.msg)?;
    memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT).map_err(|e| e.msg)
}

/// One test configuration of a low-latency round.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub nranks: usize,
    pub local_experts: usize,
    pub max_tokens: usize,
    pub hidden: usize,
    pub topk: usize,
    /// Tokens per rank: None = random in [0, B] per rank.
    pub tokens: Option<usize>,
    pub layout: Layout,
    pub routing: Routing,
    pub send_only: bool,
    pub idx64: bool,
    pub global_ids: bool,
    pub seed: u64,
}

impl Case {
    pub fn shape(&self) -> LlShape {
        LlShape {
            nranks: self.nranks,
            num_experts: self.nranks * self.local_experts,
            max_tokens: self.max_tokens,
            hidden: self.hidden,
            topk: self.topk,
        }
    }

    pub fn group_config(&self) -> ncclEpGroupConfig_t {
        let mut c: ncclEpGroupConfig_t = struct_default();
        c.version = 2;
        c.algorithm = ncclEpAlgorithm_t(0);
        c.num_experts = (self.nranks * self.local_experts) as u32;
        c.max_dispatch_tokens_per_rank = self.max_tokens as u32;
        c.max_token_bytes = (self.hidden * 2) as u32;
        c.timeout_ns = 20_000_000_000;
        c
    }

    /// A world of inputs for this case (bf16 tokens).
    pub fn world(&self, rng: &mut SplitMix64) -> LlWorld {
        self.world_of(rng)
    }

    /// A world of inputs for this case with tokens of type `T` (the random stream does not
    /// depend on `T`).
    pub fn world_of<T: TokenElem>(&self, rng: &mut SplitMix64) -> LlWorld<T> {
        let shape = self.shape();
        let ranks = (0..self.nranks)
            .map(|_| {
                let t = self.tokens.unwrap_or_else(|| rng.below(self.max_tokens + 1));
                LlRankInput {
                    num_tokens: t,
                    tokens: (0..t * shape.hidden)
                        .map(|_| T::from_f32(rng.unit_f32() * 8.0 - 4.0))
                        .collect(),
                    topk_idx: gen_routing(rng, shape, t, self.routing),
                    weights: (0..t * shape.topk).map(|_| rng.unit_f32()).collect(),
                }
            })
            .collect();
        let w = LlWorld { shape, ranks };
        w.check();
        w
    }
}

/// Device-side tensors of one rank for one round.
pub struct RankBufs {
    pub tokens: DevTensor,
    pub topk: DevTensor,
    pub weights: DevTensor,
    pub out: DevTensor,
    pub counters: DevTensor,
    pub out_idx: Option<DevTensor>,
    pub out_w: Option<DevTensor>,
    pub x: DevTensor,
    pub comb_w: DevTensor,
    pub comb_out: DevTensor,
}

pub fn alloc_rank(c: &Case, device: i32, t: usize) -> Result<RankBufs, String> {
    alloc_rank_of(c, device, t, dtype::BFLOAT16)
}

/// `alloc_rank` with token tensors (dispatch in and out, combine in and out) of type `tok`.
pub fn alloc_rank_of(c: &Case, device: i32, t: usize, tok: DType) -> Result<RankBufs, String> {
    let (n, l, b, h, k) = (c.nranks, c.local_experts, c.max_tokens, c.hidden, c.topk);
    let (out_sizes, x_sizes) = match c.layout {
        Layout::ExpertMajor => (vec![l, n * b, h], vec![l, n * b, h]),
        _ => (vec![n, b, h], vec![n, b, h]),
    };
    let em = c.layout == Layout::ExpertMajor;
    Ok(RankBufs {
        tokens: DevTensor::new(device, tok, &[t, h])?,
        topk: DevTensor::new(device, if c.idx64 { dtype::INT64 } else { dtype::INT32 }, &[t, k])?,
        weights: DevTensor::new(device, dtype::FLOAT32, &[t, k])?,
        out: DevTensor::new(device, tok, &out_sizes)?,
        counters: DevTensor::new(device, dtype::INT32, &[if em { l } else { n }])?,
        out_idx: (!em)
            .then(|| DevTensor::new(device, dtype::INT32, &[n, b, k]))
            .transpose()?,
        out_w: (!em)
            .then(|| DevTensor::new(device, dtype::FLOAT32, &[n, b, k]))
            .transpose()?,
        x: DevTensor::new(device, tok, &x_sizes)?,
        comb_w: DevTensor::new(device, dtype::FLOAT32, &[t, k])?,
        comb_out: DevTensor::new(device, tok, &[t, h])?,
    })
}

/// Sets every descriptor of a rank's buffers to this call's shape (the buffers were allocated
/// for B tokens of the largest hidden size used with them).
pub fn reshape_rank(c: &Case, b: &mut RankBufs, t: usize) {
    let (n, l, bb, h, k) = (c.nranks, c.local_experts, c.max_tokens, c.hidden, c.topk);
    let em = c.layout == Layout::ExpertMajor;
    b.tokens.reshape(dtype::BFLOAT16, &[t, h]);
    b.topk
        .reshape(if c.idx64 { dtype::INT64 } else { dtype::INT32 }, &[t, k]);
    b.weights.reshape(dtype::FLOAT32, &[t, k]);
    let out: [usize; 3] = if em { [l, n * bb, h] } else { [n, bb, h] };
    b.out.reshape(dtype::BFLOAT16, &out);
    b.x.reshape(dtype::BFLOAT16, &out);
    b.counters.reshape(dtype::INT32, &[if em { l } else { n }]);
    b.comb_w.reshape(dtype::FLOAT32, &[t, k]);
    b.comb_out.reshape(dtype::BFLOAT16, &[t, h]);
}

/// Uploads a rank's dispatch inputs and poisons its outputs.
pub fn load_inputs<T: TestToken>(c: &Case, b: &RankBufs, inp: &LlRankInput<T>) -> Result<(), String> {
    b.tokens.upload(&inp.tokens)?;
    if c.idx64 {
        b.topk.upload(&inp.topk_idx)?;
    } else {
        b.topk
            .upload(&inp.topk_idx.iter().map(|&e| e as i32).collect::<Vec<_>>())?;
    }
    b.weights.upload(&inp.weights)?;
    b.out.fill(T::poison())?;
    b.counters.fill(POISON_INT)?;
    if let Some(t) = &b.out_idx {
        t.fill(POISON_INT)?;
    }
    if let Some(t) = &b.out_w {
        t.fill(POISON_WEIGHT)?;
    }
    b.comb_out.fill(T::poison())?;
    Ok(())
}

/// The dispatch tensors that depend on the layout: expert-major counters, or rank-major weights,
/// ids, weights out, source counters and the id kind.
pub fn layout_tensors(
    c: &Case,
    b: &mut RankBufs,
    inp: &mut ncclEpDispatchInputs_t,
    out: &mut ncclEpDispatchOutputs_t,
    li: &mut ncclEpLayoutInfo_t,
) {
    if c.layout == Layout::ExpertMajor {
        li.expert_counters = b.counters.ptr();
    } else {
        inp.topk_weights = b.weights.ptr();
        out.topk_idx = b.out_idx.as_mut().unwrap().ptr();
        out.topk_weights = b.out_w.as_mut().unwrap().ptr();
        li.src_rank_counters = b.counters.ptr();
        li.recv_topk_idx_kind = ncclEpExpertIdKind_t(if c.global_ids { 2 } else { 1 });
    }
}

/// Issues rank r's dispatch (and its completion when send_only).
pub fn dispatch(c: &Case, h: ncclEpHandle_t, b: &mut RankBufs, s: &Stream, send_only: bool) -> Result<(), String> {
    let mut inp: ncclEpDispatchInputs_t = struct_default();
    let mut out: ncclEpDispatchOutputs_t = struct_default();
    let mut li: ncclEpLayoutInfo_t = struct_default();
    let mut cfg: ncclEpDispatchConfig_t = struct_default();
    cfg.send_only = send_only as u32;
    inp.tokens = b.tokens.ptr();
    out.tokens = b.out.ptr();
    layout_tensors(c, b, &mut inp, &mut out, &mut li);
    // SAFETY: the four structs are live locals and every tensor pointer a descriptor boxed in `b`
    // with its sizes array, all read during the call; the device buffers they name belong to
    // `b`, and freeing one (cuMemFree) waits for the device, so they outlive the queued work;
    // `h` is the caller's live handle, `s` a live stream (the C contract of ncclEpDispatch).
    ep_ok!(unsafe { ncclEpDispatch(h, &inp, &out, &li, &cfg, s.raw()) });
    Ok(())
}

pub fn combine(c: &Case, h: ncclEpHandle_t, b: &mut RankBufs, s: &Stream, send_only: bool) -> Result<(), String> {
    let mut inp: ncclEpCombineInputs_t = struct_default();
    let mut out: ncclEpCombineOutputs_t = struct_default();
    let mut cfg: ncclEpCombineConfig_t = struct_default();
    cfg.send_only = send_only as u32;
    inp.tokens = b.x.ptr();
    out.tokens = b.comb_out.ptr();
    if c.layout == Layout::ExpertMajor {
        out.topk_weights = b.comb_w.ptr();
    }
    // SAFETY: as in `dispatch`: live local structs and descriptors in `b`, read during the call;
    // device buffers of `b`, which outlive the queued work; `h` is the caller's live handle, `s`
    // a live stream (the C contract of ncclEpCombine).
    ep_ok!(unsafe { ncclEpCombine(h, &inp, &out, &cfg, s.raw()) });
    Ok(())
}

pub fn complete(h: ncclEpHandle_t, s: &Stream) -> Result<(), String> {
    // SAFETY: `h` is the caller's live handle, the config may be NULL, `s` is a live stream.
    ep_ok!(unsafe { ncclEpComplete(h, std::ptr::null(), s.raw()) });
    Ok(())
}

/// Compares two arrays element by element; reports the first few differences.
pub fn compare<T: PartialEq + std::fmt::Debug + Copy>(what: &str, got: &[T], want: &[T]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} elements, expected {}", got.len(), want.len()));
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).take(5).collect();
    if bad.is_empty() {
        return Ok(());
    }
    let total = (0..got.len()).filter(|&i| got[i] != want[i]).count();
    let ex: Vec<String> = bad
        .iter()
        .map(|&i| format!("[{i}] got {:?} want {:?}", got[i], want[i]))
        .collect();
    Err(format!(
        "{what}: {total} of {} elements differ, e.g. {}",
        got.len(),
        ex.join(", ")
    ))
}

/// bf16 outputs of a combine: exact, or within one bf16 step (1 ulp) of the reference.
pub fn compare_bf16_close(what: &str, got: &[u16], want: &[u16]) -> Result<(), String> {
    let far = |a: u16, b: u16| (a as i32 - b as i32).abs() > 1 && !(a & 0x7fff == 0 && b & 0x7fff == 0);
    let bad: Vec<usize> = (0..got.len().min(want.len()))
        .filter(|&i| far(got[i], want[i]))
        .take(5)
        .collect();
    if got.len() == want.len() && bad.is_empty() {
        return Ok(());
    }
    let ex: Vec<String> = bad
        .iter()
        .map(|&i| format!("[{i}] got {:#06x} want {:#06x}", got[i], want[i]))
        .collect();
    Err(format!(
        "{what}: differs from the reference beyond 1 bf16 ulp: {}",
        ex.join(", ")
    ))
}

/// Checks every rank's dispatch outputs against the reference.
pub fn check_dispatch<T: TestToken>(c: &Case, world: &LlWorld<T>, bufs: &[RankBufs]) -> Result<(), String> {
    let all: Vec<usize> = (0..c.nranks).collect();
    check_dispatch_links(c, world, bufs, &LlLinks::all(c.nranks), &all)
}

/// Checks the dispatch outputs of `ranks` against the reference with rank masks (`links`).
pub fn check_dispatch_links<T: TestToken>(
    c: &Case,
    world: &LlWorld<T>,
    bufs: &[RankBufs],
    links: &LlLinks,
    ranks: &[usize],
) -> Result<(), String> {
    let kind = if c.global_ids {
        ExpertIdKind::Global
    } else {
        ExpertIdKind::Local
    };
    let want = ll_dispatch_ref_masked(
        world,
        c.layout,
        kind,
        LlPoison {
            token: T::poison(),
            weight: POISON_WEIGHT,
        },
        links,
    );
    for (r, (b, w)) in bufs.iter().zip(&want).enumerate() {
        if !ranks.contains(&r) {
            continue;
        }
        compare(
            &format!("rank {r} dispatch tokens"),
            &b.out.download::<T>()?,
            w.tokens(),
        )?;
        check_dispatch_meta(&format!("rank {r}"), b, w)?;
    }
    Ok(())
}

/// Checks a rank's dispatch outputs other than the tokens (counters; rank-major ids and
/// weights) against its reference output.
pub fn check_dispatch_meta<T>(who: &str, b: &RankBufs, w: &LlDispatchOut<T>) -> Result<(), String> {
    match w {
        LlDispatchOut::ExpertMajor { expert_counters, .. } => compare(
            &format!("{who} expert_counters"),
            &b.counters.download::<i32>()?,
            expert_counters,
        )?,
        LlDispatchOut::RankMajor {
            topk_idx,
            topk_weights,
            src_rank_counters,
            ..
        } => {
            compare(
                &format!("{who} src_rank_counters"),
                &b.counters.download::<i32>()?,
                src_rank_counters,
            )?;
            compare(
                &format!("{who} topk_idx"),
                &b.out_idx.as_ref().unwrap().download::<i32>()?,
                topk_idx,
            )?;
            let gw: Vec<u32> = b
                .out_w
                .as_ref()
                .unwrap()
                .download::<f32>()?
                .iter()
                .map(|f| f.to_bits())
                .collect();
            let ww: Vec<u32> = topk_weights.iter().map(|f| f.to_bits()).collect();
            compare(&format!("{who} topk_weights"), &gw, &ww)?;
        }
    }
    Ok(())
}

/// Per rank: expert outputs (bits of `T`, bf16 by default) and EM combine weights.
pub type CombineInputs<T = u16> = (Vec<Vec<T>>, Vec<Vec<f32>>);

/// Random expert outputs (and EM combine weights) for every rank; returns them for the reference.
pub fn load_combine_inputs<T: TestToken>(
    c: &Case,
    world: &LlWorld<T>,
    bufs: &[RankBufs],
    rng: &mut SplitMix64,
) -> Result<CombineInputs<T>, String> {
    let mut xs = Vec::new();
    let mut ws = Vec::new();
    for (b, inp) in bufs.iter().zip(&world.ranks) {
        let n = b.x.bytes / std::mem::size_of::<T>();
        let x: Vec<T> = (0..n).map(|_| T::from_f32(rng.unit_f32() * 4.0 - 2.0)).collect();
        b.x.upload(&x)?;
        let w: Vec<f32> = (0..inp.num_tokens * c.topk).map(|_| rng.unit_f32()).collect();
        b.comb_w.upload(&w)?;
        xs.push(x);
        ws.push(w);
    }
    Ok((xs, ws))
}

pub fn check_combine<T: TestToken>(
    c: &Case,
    world: &LlWorld<T>,
    bufs: &[RankBufs],
    xs: &[Vec<T>],
    ws: &[Vec<f32>],
) -> Result<(), String> {
    let all: Vec<usize> = (0..c.nranks).collect();
    check_combine_links(c, world, bufs, xs, ws, &LlLinks::all(c.nranks), &all)
}

/// Checks the combine outputs of `ranks` against the reference with rank masks (`links`).
pub fn check_combine_links<T: TestToken>(
    c: &Case,
    world: &LlWorld<T>,
    bufs: &[RankBufs],
    xs: &[Vec<T>],
    ws: &[Vec<f32>],
    links: &LlLinks,
    ranks: &[usize],
) -> Result<(), String> {
    let input = match c.layout {
        Layout::ExpertMajor => LlCombineIn::ExpertMajor { x: xs, weights: ws },
        _ => LlCombineIn::RankMajor { y: xs },
    };
    let want = ll_combine_ref_masked(world, input, links);
    for (r, (b, w)) in bufs.iter().zip(&want).enumerate() {
        if !ranks.contains(&r) {
            continue;
        }
        T::compare_combined(&format!("rank {r} combine"), &b.comb_out.download::<T>()?, w)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Masks

/// The wait bound of a group configured with `default_ns`: `NCCL_EP_TIMEOUT_MS` overrides every
/// group's timeout when set to a positive number.
pub fn timeout_or_env(default_ns: u64) -> std::time::Duration {
    match std::env::var("NCCL_EP_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
    {
        Some(ms) => std::time::Duration::from_millis(ms),
        None => std::time::Duration::from_nanos(default_ns),
    }
}

/// `ncclEpMaskQuery` of one rank on device 0, read back (waits for `s`).
pub fn mask_of(g: ncclEpGroup_t, nranks: usize, s: &Stream) -> Result<Vec<i32>, String> {
    mask_of_on(0, g, nranks, s)
}

/// `ncclEpMaskQuery` of one rank whose group is on `device`, read back (waits for `s`).
pub fn mask_of_on(device: i32, g: ncclEpGroup_t, nranks: usize, s: &Stream) -> Result<Vec<i32>, String> {
    let t = DevTensor::new(device, dtype::INT32, &[nranks])?;
    t.fill(-1i32)?;
    // SAFETY: `g` is the caller's live group on `device` and `nranks` its rank count (every
    // caller passes its world size); `t` holds that many device ints, what the query writes, and
    // lives past `s.sync()` below, which waits for the write.
    ep_ok!(unsafe { nccl_ep::abi::mask::ncclEpMaskQuery(g, t.mem.ptr() as *mut i32, s.raw()) });
    s.sync()?;
    t.download::<i32>()
}

/// `ncclEpMaskUpdate` of one rank from a host array (waits for `s`).
pub fn set_mask(g: ncclEpGroup_t, mask: &[i32], s: &Stream) -> Result<(), String> {
    // SAFETY: `g` is the caller's live group; `mask` is a host array of one int per rank of it
    // (every caller builds it for its world size), read during the call; `s` is a live stream.
    ep_ok!(unsafe { nccl_ep::abi::mask::ncclEpMaskUpdate(g, mask.as_ptr(), s.raw()) });
    s.sync()
}

/// `ncclEpGetAsyncError` of one rank.
pub fn async_error(g: ncclEpGroup_t) -> Result<i32, String> {
    let mut e = -1;
    // SAFETY: `g` is the caller's live group; the call writes one int to the live local `e`.
    ep_ok!(unsafe { nccl_ep::abi::mask::ncclEpGetAsyncError(g, &mut e) });
    Ok(e)
}

/// A one-rank NCCL communicator on device 0 (NCCL loaded with dlopen, as the library does).
pub fn nccl_one_rank_comm() -> Result<ncclComm_t, String> {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct UniqueId([u8; 128]);
    type GetId = unsafe extern "C" fn(*mut UniqueId) -> i32;
    type InitRank = unsafe extern "C" fn(*mut ncclComm_t, i32, UniqueId, i32) -> i32;
    let name = std::ffi::CString::new("libnccl.so.2").unwrap();
    // SAFETY: `name` is a NUL-terminated string alive for the call.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err("libnccl.so.2 not found".into());
    }
    // SAFETY: `h` is a live handle (never closed; checked non-NULL above) and the temporary
    // CString lives until the end of the call.
    let sym = |n: &str| unsafe { libc::dlsym(h, std::ffi::CString::new(n).unwrap().as_ptr()) };
    let (gid, init) = (sym("ncclGetUniqueId"), sym("ncclCommInitRank"));
    if gid.is_null() || init.is_null() {
        return Err("NCCL symbols missing".into());
    }
    // SAFETY: both symbols are non-NULL (checked above) and these are their nccl.h prototypes:
    // `ncclGetUniqueId(ncclUniqueId*)` and `ncclCommInitRank(ncclComm_t*, int, ncclUniqueId,
    // int)`, returning the int-sized `ncclResult_t`; `UniqueId` is the 128-byte C struct.
    let gid = unsafe { std::mem::transmute::<*mut libc::c_void, GetId>(gid) };
    // SAFETY: as above.
    let init = unsafe { std::mem::transmute::<*mut libc::c_void, InitRank>(init) };
    let mut id = UniqueId([0u8; 128]);
    let _g = nccl_ep::cuda::context::CtxGuard::enter(0).map_err(|e| e.msg)?;
    let mut comm = std::ptr::null_mut();
    // SAFETY: the library is never closed, so both functions stay loaded; `gid` writes 128 bytes
    // to the live local `id`, `init` one handle to the live local `comm` (a 1-rank world, rank
    // 0, on device 0, whose context is current).
    unsafe {
        if gid(&mut id) != 0 || init(&mut comm, 1, id, 0) != 0 {
            return Err("ncclCommInitRank failed".into());
        }
    }
    Ok(comm)
}

// ---------------------------------------------------------------------------------------------
// NVFP4: the GPU's reciprocal

/// A kernel that evaluates `rcp.approx.ftz.f32`, the reciprocal NVFP4's sender uses (as NCCL
/// EP's does), for a list of inputs.
pub const RCP_ORACLE: nccl_ep::cuda::KernelSource = nccl_ep::cuda::KernelSource {
    name: "nvfp4_rcp_oracle.cu",
    source: "extern \"C\" __global__ void nvfp4_rcp_oracle(const float* x, float* y, unsigned n) {\n\
             unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n\
             if (i < n) { float r; asm(\"rcp.approx.ftz.f32 %0, %1;\" : \"=f\"(r) : \"f\"(x[i])); y[i] = r; }\n\
             }\n",
};

/// `rcp.approx.ftz.f32` as this GPU computes it, for the inputs asked so far: the sender's
/// reciprocal for the CPU reference of NVFP4 combine (ep_reference::ll::Nvfp4Rcp), which no
/// CPU can compute (it is within 1 ulp of 1/x, not always the nearest float).
#[derive(Default)]
pub struct GpuRcp {
    map: std::collections::HashMap<u32, f32>,
}

impl GpuRcp {
    /// Evaluates the inputs not seen yet on `device` (synchronously, on the legacy stream).
    pub fn add(&mut self, device: i32, xs: &[f32]) -> Result<(), String> {
        use nccl_ep::cuda::{self, Defines};
        let mut todo: Vec<f32> = xs
            .iter()
            .copied()
            .filter(|x| !self.map.contains_key(&x.to_bits()))
            .collect();
        todo.sort_by_key(|x| x.to_bits());
        todo.dedup_by_key(|x| x.to_bits());
        if todo.is_empty() {
            return Ok(());
        }
        let f = cuda::get_function(device, &RCP_ORACLE, &Defines::new(), "nvfp4_rcp_oracle").map_err(|e| e.msg)?;
        let _g = CtxGuard::enter(device).map_err(|e| e.msg)?;
        let bytes = todo.len() * 4;
        let x = DeviceMem::alloc(device, bytes).map_err(|e| e.msg)?;
        let y = DeviceMem::alloc(device, bytes).map_err(|e| e.msg)?;
        // SAFETY: `x` holds todo.len() floats.
        unsafe { memory::memcpy_htod(x.ptr(), &todo) }.map_err(|e| e.msg)?;
        let (xp, yp, n) = (x.ptr(), y.ptr(), todo.len() as u32);
        let mut args = nccl_ep::kernel_args![&xp, &yp, &n];
        let s = memory::Stream::LEGACY_DEFAULT;
        // SAFETY: nvfp4_rcp_oracle(const float*, float*, unsigned) gets two device pointers of n
        // floats each and n, in order; `args` and both buffers outlive the synchronised launch.
        unsafe { cuda::launch(f, n.div_ceil(256), 256, 0, s, &mut args) }.map_err(|e| e.msg)?;
        memory::stream_synchronize(s).map_err(|e| e.msg)?;
        let mut out = vec![0f32; todo.len()];
        // SAFETY: `y` holds n floats; any bits are a valid f32.
        unsafe { memory::memcpy_dtoh(&mut out, y.ptr()) }.map_err(|e| e.msg)?;
        for (a, r) in todo.into_iter().zip(out) {
            self.map.insert(a.to_bits(), r);
        }
        Ok(())
    }

    /// The GPU's reciprocal of `x` (asked for before).
    pub fn get(&self, x: f32) -> f32 {
        *self
            .map
            .get(&x.to_bits())
            .unwrap_or_else(|| panic!("GpuRcp: {x:e} ({:#x}) was not evaluated", x.to_bits()))
    }

    /// Everything the sender may need for rows with global scales `gs` (two rounds: 6 and the
    /// scales, then value(sc) · rcp(g) for every E4M3 code).
    pub fn for_scales(&mut self, device: i32, gs: &[f32]) -> Result<(), String> {
        let mut first = vec![6.0f32];
        first.extend(gs.iter().copied().filter(|&g| g != 0.0));
        self.add(device, &first)?;
        let rest = nvfp4_rcp_inputs(gs, |g| self.get(g));
        self.add(device, &rest)
    }
}
