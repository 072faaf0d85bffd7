use std::path::PathBuf;

use aya_build::{Package, Toolchain};

/// Builds `persona-ebpf` for the BPF target and leaves the object in OUT_DIR, where
/// `include_bytes_aligned!` picks it up.
fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../persona-ebpf");
    let root_dir = root.to_str().expect("workspace path is UTF-8");
    // The programs are built of persona-common's types too: a change there (a map's
    // size, a struct's layout) must rebuild the object, or the two sides disagree.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../persona-common").display()
    );
    aya_build::build_ebpf(
        [Package {
            name: "persona-ebpf",
            root_dir,
            no_default_features: false,
            features: &[],
        }],
        Toolchain::default(),
    )
}
