//! Test hosts for the real filter: a wasmtime host implementing the proxy-wasm ABI
//! ([`wasm_host`]), and helpers shared by the end-to-end tests through a real Envoy.

pub mod collector;
pub mod faults;
pub mod http;
pub mod wasm_host;

use std::path::PathBuf;

/// Each test body named runs against both adapters, as `wasm::<name>` and `native::<name>`:
/// `with_both_adapters!(a, b)` in a test file whose `fn a(adapter: Adapter)` and
/// `fn b(adapter: Adapter)` are the bodies.
#[macro_export]
macro_rules! with_both_adapters {
    ($($test:ident),* $(,)?) => {
        mod wasm {
            $(#[test]
            fn $test() {
                super::$test(tollgate_devkit::Adapter::Wasm)
            })*
        }
        mod native {
            $(#[test]
            fn $test() {
                super::$test(tollgate_devkit::Adapter::Native)
            })*
        }
    };
}

/// The release .wasm the tests load: `$TOLLGATE_WASM`, else the workspace's build output
/// (`make wasm` builds it).
pub fn filter_wasm_path() -> PathBuf {
    if let Some(path) = std::env::var_os("TOLLGATE_WASM") {
        return PathBuf::from(path);
    }
    workspace_root().join("target/wasm32-wasip1/release/tollgate_filter.wasm")
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
