//! The library's diagnostics on stderr, as NCCL EP prints them (`NCCL_EP_DEBUG`). A leaf module:
//! every layer may log, none through another layer.

use std::sync::OnceLock;

/// Log level from `NCCL_EP_DEBUG` (read once): 0 off, 1 WARN, 2 INFO.
pub fn debug_level() -> u8 {
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("NCCL_EP_DEBUG") {
        Ok(v) => match v.trim().to_ascii_uppercase().as_str() {
            "INFO" | "TRACE" | "2" => 2,
            "" | "0" | "OFF" | "FALSE" | "NONE" => 0,
            _ => 1,
        },
        Err(_) => 0,
    })
}

/// Writes an INFO line to stderr when `NCCL_EP_DEBUG=INFO`.
pub fn log_info(msg: impl std::fmt::Display) {
    if debug_level() >= 2 {
        eprintln!("NCCL EP INFO {msg}");
    }
}

/// Writes an ERROR line to stderr whatever `NCCL_EP_DEBUG` says: for failures no call returns
/// (found by a background thread), which would otherwise go unseen, as the GPU timeouts' own
/// lines are printed unconditionally.
pub fn log_error(msg: impl std::fmt::Display) {
    eprintln!("NCCL EP ERROR {msg}");
}

/// Writes a WARN line to stderr when `NCCL_EP_DEBUG` is WARN or INFO.
pub fn log_warn(msg: impl std::fmt::Display) {
    if debug_level() >= 1 {
        eprintln!("NCCL EP WARN {msg}");
    }
}
