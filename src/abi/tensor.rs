//! Tensor descriptors: `ncclEpTensorAlloc` / `ncclEpTensorDestroy` and the checked read of any
//! caller descriptor into a [`TensorView`].

use super::enums::{NCCL_EP_TENSOR_ALLOC_MAGIC, NCCL_EP_TENSOR_MAGIC};
use super::guard::{ffi_call, out_ptr, read_opt};
use super::types::*;
use ep_core::error::Result;
use ep_core::tensor::TensorView;
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::ffi::c_uint;

/// Bigger ranks than this are a corrupted descriptor, not a tensor.
pub const MAX_NDIM: u32 = 8;

/// A descriptor owned by the library: the public part plus its own copy of the extents.
struct Owned {
    desc: Box<ncclEpTensor_t>,
    sizes: Box<[usize]>,
}

// SAFETY: the raw pointers inside only refer to the Box above (sizes) or to caller device memory.
unsafe impl Send for Owned {}

/// Descriptors handed out by `ncclEpTensorAlloc`, by address. A registry rather than a hidden
/// header before the struct, so that checking a descriptor never reads memory the caller did not
/// give us.
fn registry() -> &'static Mutex<HashMap<usize, Owned>> {
    static R: std::sync::OnceLock<Mutex<HashMap<usize, Owned>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

fn lock_registry() -> MutexGuard<'static, HashMap<usize, Owned>> {
    registry().lock()
}

/// Reads an optional caller tensor: NULL gives `None`; otherwise the descriptor must be
/// initialised (tensor magic, or one of ours with its extents untouched), at least 48 bytes,
/// of a sane rank, and bound to memory (data, a window, or empty).
///
/// # Safety
/// `p` is NULL or points at a readable `ncclEpTensor_t` whose `sizes` holds `ndim` values.
pub unsafe fn read_tensor_opt(p: *const ncclEpTensor_t, name: &str) -> Result<Option<TensorView>> {
    // SAFETY: non-NULL descriptors are readable by the C contract.
    let Some(t) = (unsafe { p.as_ref() }) else {
        return Ok(None);
    };
    match t.magic {
        NCCL_EP_TENSOR_MAGIC => {}
        NCCL_EP_TENSOR_ALLOC_MAGIC => {
            let reg = lock_registry();
            let ok = reg
                .get(&(p as usize))
                .is_some_and(|o| std::ptr::eq(o.sizes.as_ptr(), t.sizes));
            ep_core::ensure_arg!(
                ok,
                "{name} claims to come from ncclEpTensorAlloc but is not a live descriptor of it (or its sizes pointer was changed)"
            );
        }
        m => {
            return Err(ep_core::invalid_arg!(
                "{name}: tensor magic is {m:#010x}; initialise the descriptor with NCCL_EP_TENSOR_INIT or ncclEpTensorAlloc"
            ));
        }
    }
    ep_core::ensure_arg!(
        t.size >= 48,
        "{name}: tensor size field is {}, expected at least 48",
        t.size
    );
    ep_core::ensure_arg!(
        (1..=MAX_NDIM).contains(&t.ndim),
        "{name}: ndim is {}, expected 1..={MAX_NDIM}",
        t.ndim
    );
    ep_core::ensure_arg!(!t.sizes.is_null(), "{name}: sizes is NULL");
    // The datatype is not checked here: NCCL EP checks it only where a call uses the tensor (the
    // rules in core do the same: every tensor a call reads or writes is checked against the types
    // it may have), and ignores it on the optional tensors it ignores.
    // SAFETY: sizes points at ndim extents (C contract), checked non-NULL above.
    let sizes = unsafe { std::slice::from_raw_parts(t.sizes, t.ndim as usize) };
    // Checked extents: a count or byte size that does not fit in usize is refused here.
    let view = TensorView::new(t.datatype, sizes, t.data as u64)
        .map_err(|e| e.context(name))?
        .with_window(t.win_hdl as u64, t.win_offset as u64);
    // A window-backed tensor may leave data NULL: the runtime resolves it through the group's
    // communicator (runtime::window), which the descriptor alone does not know.
    ep_core::ensure_arg!(
        !t.data.is_null() || view.is_windowed() || view.is_empty(),
        "{name}: data and win_hdl are both NULL and the tensor is not empty"
    );
    Ok(Some(view))
}

/// Like [`read_tensor_opt`] for a tensor the call requires.
///
/// # Safety
/// As [`read_tensor_opt`].
pub unsafe fn read_tensor(p: *const ncclEpTensor_t, name: &str) -> Result<TensorView> {
    // SAFETY: forwarded contract.
    unsafe { read_tensor_opt(p, name) }?.ok_or_else(|| ep_core::invalid_arg!("{name} is NULL (a tensor is required)"))
}

/// Allocates a descriptor (not its data) of `ndim` extents; the caller sets `data` afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpTensorAlloc(
    tensor: *mut *mut ncclEpTensor_t,
    ndim: c_uint,
    datatype: ncclDataType_t,
    sizes: *const usize,
    config: *const ncclEpTensorAllocConfig_t,
) -> ncclResult_t {
    ffi_call("ncclEpTensorAlloc", || {
        // SAFETY: C contract.
        let out = unsafe { out_ptr(tensor, "tensor") }?;
        *out = std::ptr::null_mut();
        // SAFETY: C contract.
        unsafe { read_opt(config, "config") }?;
        ep_core::ensure_arg!(!sizes.is_null(), "sizes is NULL");
        ep_core::ensure_arg!(
            (1..=MAX_NDIM).contains(&ndim),
            "ndim is {ndim}, expected 1..={MAX_NDIM}"
        );
        // Any datatype, as NCCL EP: a descriptor is not a use (the call that uses it checks it).
        // SAFETY: sizes points at ndim values (C contract), checked non-NULL.
        let mut own: Box<[usize]> = unsafe { std::slice::from_raw_parts(sizes, ndim as usize) }.into();
        let desc = Box::new(ncclEpTensor_t {
            size: std::mem::size_of::<ncclEpTensor_t>() as u32,
            magic: NCCL_EP_TENSOR_ALLOC_MAGIC,
            ndim,
            datatype,
            data: std::ptr::null_mut(),
            win_hdl: std::ptr::null_mut(),
            win_offset: 0,
            sizes: own.as_mut_ptr(),
        });
        let ptr = &*desc as *const ncclEpTensor_t as *mut ncclEpTensor_t;
        lock_registry().insert(ptr as usize, Owned { desc, sizes: own });
        *out = ptr;
        Ok(())
    })
}

/// Frees a descriptor made by `ncclEpTensorAlloc` (never the data it points at).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpTensorDestroy(tensor: *mut ncclEpTensor_t) -> ncclResult_t {
    ffi_call("ncclEpTensorDestroy", || {
        if tensor.is_null() {
            return Ok(());
        }
        let mut reg = lock_registry();
        match reg.get(&(tensor as usize)) {
            Some(o) if std::ptr::eq(o.desc.sizes, o.sizes.as_ptr()) => {
                reg.remove(&(tensor as usize));
                Ok(())
            }
            Some(_) => Err(ep_core::invalid_arg!(
                "tensor: its sizes pointer was changed after ncclEpTensorAlloc; not freeing it"
            )),
            None => Err(ep_core::invalid_arg!(
                "tensor was not allocated by ncclEpTensorAlloc (or was already destroyed); stack descriptors need no destroy"
            )),
        }
    })
}
