//! Compiles every `.proto` under this crate with protox (pure Rust), so no `protoc` is needed.

use std::path::{Path, PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: cargo reuses a compiled build
    // script for the same crate checked out elsewhere (another worktree with this target dir).
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = root.as_path();
    let mut files = Vec::new();
    collect(root, root, &mut files)?;
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(&files, [root])?;
    // Served by every daemon's reflection service, so grpcurl needs no .proto files.
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// Every .proto file below `dir`, relative to `root`, skipping build output.
fn collect(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n != "target" && n != "src")
            {
                collect(root, &path, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}
