//! The filter packaged as an OCI image layout that Istio's agent can pull once it is copied to
//! a registry (`oras cp --from-oci-layout`, `skopeo copy oci:…`, `crane push`): the "oci"
//! variant of the Wasm image specification Istio implements (solo-io/wasm `spec/README.md`).
//! One layer holds the module's bytes (`application/vnd.module.wasm.content.layer.v1+wasm`),
//! the config is `application/vnd.module.wasm.config.v1+json`; no tar, no base image.
//!
//! Content-addressed and reproducible: the same module and tag give the same digests.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// A blob's digest, `sha256:<hex>`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

fn write_blob(dir: &Path, bytes: &[u8]) -> Result<()> {
    let name = digest(bytes);
    let hex = name.trim_start_matches("sha256:");
    let path = dir.join("blobs/sha256").join(hex);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Write `wasm` as an OCI image layout in `dir` (created; its previous content replaced),
/// tagged `tag`. Returns the manifest's digest, which pins the image (Istio's `sha256` field
/// checks the module's own digest, which is the layer's).
pub fn write_layout(wasm: &[u8], dir: &Path, tag: &str, version: &str) -> Result<String> {
    anyhow::ensure!(
        wasm.starts_with(b"\0asm"),
        "not a WebAssembly module (no \\0asm magic)"
    );
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    // The runtime config of the spec: the target runtime, the proxy-wasm ABI the module
    // speaks, and the root ids it registers (Tollgate has one, the default).
    let config = serde_json::to_vec(&json!({
        "type": "envoy_proxy",
        "abiVersions": ["proxy_abi_version_0_2_1"],
        "config": {"root_ids": [""]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config),
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": digest(wasm),
            "size": wasm.len(),
            "annotations": {"org.opencontainers.image.title": "plugin.wasm"},
        }],
        "annotations": {
            "org.opencontainers.image.title": "tollgate-filter",
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.description": "Tollgate: pay-per-use licensing for APIs, a proxy-wasm HTTP filter for Envoy and Istio",
        },
    }))?;
    write_blob(dir, &config)?;
    write_blob(dir, wasm)?;
    write_blob(dir, &manifest)?;
    let mut index_entry = descriptor(MANIFEST_MEDIA_TYPE, &manifest);
    index_entry["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [index_entry],
        }))?,
    )?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(digest(&manifest))
}

/// Read a layout back, checking every digest and size on the way: the module tagged `tag`.
pub fn read_layout(dir: &Path, tag: &str) -> Result<Vec<u8>> {
    let layout: Value = serde_json::from_slice(&std::fs::read(dir.join("oci-layout"))?)?;
    anyhow::ensure!(
        layout["imageLayoutVersion"] == "1.0.0",
        "oci-layout: {layout}"
    );
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|e| e["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .with_context(|| format!("no manifest tagged {tag}"))?;
    let blob = |descriptor: &Value| -> Result<Vec<u8>> {
        let name = descriptor["digest"]
            .as_str()
            .context("a descriptor has no digest")?;
        let hex = name
            .strip_prefix("sha256:")
            .context("a digest is not sha256")?;
        let bytes = std::fs::read(dir.join("blobs/sha256").join(hex))?;
        anyhow::ensure!(
            digest(&bytes) == name,
            "blob {name} does not match its digest"
        );
        anyhow::ensure!(
            descriptor["size"].as_u64() == Some(bytes.len() as u64),
            "blob {name} does not have its size"
        );
        Ok(bytes)
    };
    anyhow::ensure!(entry["mediaType"] == MANIFEST_MEDIA_TYPE, "index: {entry}");
    let manifest: Value = serde_json::from_slice(&blob(entry)?)?;
    anyhow::ensure!(
        manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE,
        "{manifest}"
    );
    let config: Value = serde_json::from_slice(&blob(&manifest["config"])?)?;
    anyhow::ensure!(config["type"] == "envoy_proxy", "config: {config}");
    let layers = manifest["layers"].as_array().context("no layers")?;
    anyhow::ensure!(
        layers.len() == 1,
        "one layer expected, got {}",
        layers.len()
    );
    let layer = layers.first().context("no layer")?;
    anyhow::ensure!(layer["mediaType"] == LAYER_MEDIA_TYPE, "{layer}");
    blob(layer)
}
