//! The committed headers must be exactly what cbindgen generates from the Rust types.
//! `NCCL_EP_BLESS=1 cargo test --test header` (or `make header`) rewrites them.

use std::path::Path;

fn generate(config: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(Path::new(root).join(config)).expect("cbindgen config");
    let mut out = Vec::new();
    // Only the C boundary is parsed (src/abi and the modules it declares): the runtime, the
    // transport and the core never reach the header.
    cbindgen::Builder::new()
        .with_src(Path::new(root).join("src/abi/mod.rs"))
        .with_config(cfg)
        .generate()
        .expect("cbindgen generates")
        .write(&mut out);
    String::from_utf8(out).expect("utf-8")
}

fn check(config: &str, header: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let want = generate(config);
    let path = root.join(header);
    if std::env::var_os("NCCL_EP_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write header");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{header} is stale: run `make header` and commit it");
}

#[test]
fn nccl_ep_h_is_generated() {
    check("cbindgen.toml", "include/nccl_ep.h");
}

#[test]
fn ep_enums_h_is_generated() {
    check("cbindgen-enums.toml", "include/nccl_ep/ep_enums.h");
}

#[test]
fn nccl_ep_ext_h_is_generated() {
    check("cbindgen-ext.toml", "include/nccl_ep_ext.h");
}
