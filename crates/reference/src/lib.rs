//! The CPU reference of nccl-ep-rs: what every dispatch and combine must produce, computed on
//! the host from the whole group's inputs. It is the test oracle the GPU kernels are compared
//! against (bit for bit), written from the API's definitions; the library does not depend on
//! it (a dev-dependency of the tests only).

#![forbid(unsafe_code)]

pub mod ht;
pub mod ll;
