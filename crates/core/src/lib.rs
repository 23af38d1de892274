//! The pure core of nccl-ep-rs: validation rules, configuration, buffer planners and routing
//! math, on domain types only. No FFI types and no CUDA: the C boundary (`src/abi` of the
//! library) converts C structs into these types, and the runtime turns plans into launches.
//! The CPU reference that tests compare the GPU against is a separate crate
//! (`crates/reference`), which the library does not depend on.

#![forbid(unsafe_code)]

pub mod config;
pub mod enums;
pub mod error;
pub mod fnv;
pub mod handle_rules;
pub mod ht_errors;
pub mod ht_layout;
pub mod ht_rules;
pub mod ll_layout;
pub mod ll_recipes;
pub mod ll_rules;
pub mod op_args;
pub mod rank_set;
pub mod size_math;
pub mod tensor;
pub mod zero_copy;

pub use enums::{Algorithm, DType, ExpertIdKind, Layout, OverflowPolicy, PassDir, dtype};
pub use error::{Error, ErrorKind, Result};
