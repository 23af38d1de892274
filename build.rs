// The shared object must carry the upstream SONAME so that binaries linked against
// NVIDIA's libnccl_ep.so.0 load ours unchanged.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnccl_ep.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
