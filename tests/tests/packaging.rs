//! The filter packaged for Istio: an OCI image layout of the real release module, every
//! digest and size checked, reproducible, and refusing tampered blobs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_devkit::oci::{read_layout, write_layout, LAYER_MEDIA_TYPE};
use tollgate_tests::filter_wasm_path;

#[test]
fn the_release_module_packs_into_an_oci_layout_istio_can_pull() {
    let module = std::fs::read(filter_wasm_path()).expect("make wasm builds the filter");
    let dir = std::env::temp_dir().join(format!("tollgate-oci-{}", std::process::id()));
    let manifest = write_layout(&module, &dir, "0.1.0", "0.1.0").unwrap();
    assert!(manifest.starts_with("sha256:") && manifest.len() == 7 + 64);
    // Read back through the index, manifest and config: the same bytes.
    assert_eq!(read_layout(&dir, "0.1.0").unwrap(), module);
    assert!(read_layout(&dir, "latest").is_err(), "only the tag given");
    // The manifest is what Istio's fetcher dispatches on: one layer, the module's media type.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let hex = manifest.trim_start_matches("sha256:");
    assert_eq!(index["manifests"][0]["digest"], manifest.as_str());
    let body: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap())
            .unwrap();
    assert_eq!(body["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
    assert_eq!(body["layers"][0]["size"], module.len());
    // Reproducible: the same module and tag give the same manifest digest.
    assert_eq!(
        write_layout(&module, &dir, "0.1.0", "0.1.0").unwrap(),
        manifest
    );
    // A tampered module is refused on reading.
    let layer = body["layers"][0]["digest"].as_str().unwrap();
    let path = dir
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut tampered = std::fs::read(&path).unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    std::fs::write(&path, tampered).unwrap();
    let e = read_layout(&dir, "0.1.0").unwrap_err().to_string();
    assert!(e.contains("does not match its digest"), "{e}");
    // Not a module: refused before anything is written.
    assert!(write_layout(b"<html>", &dir, "x", "x").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
