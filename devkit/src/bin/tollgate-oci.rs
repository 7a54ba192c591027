//! Package the filter as an OCI image layout for Istio: `tollgate-oci [wasm] [dir] [tag]`.
//! Defaults: the release build, `target/oci/tollgate-filter`, the crate version. Copy the
//! layout to a registry with any OCI tool, e.g.
//! `oras cp --from-oci-layout target/oci/tollgate-filter:0.1.0 registry.example.com/tollgate/filter:0.1.0`
//! or `skopeo copy oci:target/oci/tollgate-filter:0.1.0 docker://registry.example.com/tollgate/filter:0.1.0`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tollgate_devkit::envoy::workspace_root;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let root = workspace_root();
    let wasm = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(tollgate_devkit::envoy::filter_wasm_path);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/oci/tollgate-filter"));
    let version = env!("CARGO_PKG_VERSION");
    let tag = args.next().unwrap_or_else(|| version.to_string());
    let module = std::fs::read(&wasm)
        .with_context(|| format!("reading {} (run `make wasm` first)", wasm.display()))?;
    let manifest = tollgate_devkit::oci::write_layout(&module, &dir, &tag, version)?;
    // Read back: every digest and size checked.
    tollgate_devkit::oci::read_layout(&dir, &tag)?;
    let dir = dir.canonicalize().unwrap_or(dir);
    println!("OCI image layout: {}", dir.display());
    println!("  tag      {tag}");
    println!("  manifest {manifest}");
    println!(
        "  module   {} ({} bytes)",
        tollgate_devkit::oci::digest(&module),
        module.len()
    );
    println!(
        "push it:  oras cp --from-oci-layout {}:{tag} <registry>/tollgate/filter:{tag}",
        dir.display()
    );
    println!("then set the WasmPlugin's url to oci://<registry>/tollgate/filter:{tag}");
    Ok(())
}
