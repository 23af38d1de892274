//! The library's error: a kind that maps onto `ncclResult_t` and a message for the caller.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad pointer, size, magic, enum value, shape or data type (`ncclInvalidArgument`).
    InvalidArgument,
    /// A valid value used where the mode, layout or capacity forbids it (`ncclInvalidUsage`).
    InvalidUsage,
    /// The CUDA driver, runtime or NVRTC failed (`ncclUnhandledCudaError`).
    Cuda,
    /// NCCL returned this code; it is passed through.
    Nccl(i32),
    /// The operating system refused something (library loading, files) (`ncclSystemError`).
    System,
    /// A bug of ours, or a state we cannot explain (`ncclInternalError`).
    Internal,
    /// A peer did not answer in time (`ncclTimeout`).
    Timeout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub msg: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Self { kind, msg: msg.into() }
    }
    /// The `ncclResult_t` value the C caller receives.
    pub fn code(&self) -> i32 {
        match self.kind {
            ErrorKind::InvalidArgument => 4,
            ErrorKind::InvalidUsage => 5,
            ErrorKind::Cuda => 1,
            ErrorKind::Nccl(c) => c,
            ErrorKind::System => 2,
            ErrorKind::Internal => 3,
            ErrorKind::Timeout => 8,
        }
    }
    /// Prefixes the message with where it happened.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// `return Err(invalid_arg!("..."))`-style constructors.
#[macro_export]
macro_rules! invalid_arg {
    ($($t:tt)*) => { $crate::error::Error::new($crate::error::ErrorKind::InvalidArgument, format!($($t)*)) };
}
#[macro_export]
macro_rules! invalid_usage {
    ($($t:tt)*) => { $crate::error::Error::new($crate::error::ErrorKind::InvalidUsage, format!($($t)*)) };
}
#[macro_export]
macro_rules! internal_err {
    ($($t:tt)*) => { $crate::error::Error::new($crate::error::ErrorKind::Internal, format!($($t)*)) };
}
/// Fails with InvalidArgument unless the condition holds.
#[macro_export]
macro_rules! ensure_arg {
    ($cond:expr, $($t:tt)*) => { if !($cond) { return Err($crate::invalid_arg!($($t)*)); } };
}
#[macro_export]
macro_rules! ensure_usage {
    ($cond:expr, $($t:tt)*) => { if !($cond) { return Err($crate::invalid_usage!($($t)*)); } };
}
