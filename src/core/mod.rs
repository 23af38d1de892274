//! The pure core: no GPU, no FFI. Validation rules, buffer planning, and the CPU reference.

pub mod config;
pub mod error;
pub mod handle_rules;
pub mod ht_layout;
pub mod ht_reference;
pub mod ht_rules;
pub mod ll_layout;
pub mod ll_rules;
pub mod op_args;
pub mod reference;
pub mod size_math;
pub mod tensor;
