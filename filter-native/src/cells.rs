//! Shared state in native memory: one store per configuration, shared by every worker thread.
//!
//! The core reads a cell, decides, and writes back with compare-and-swap, as it does over
//! proxy-wasm shared data. Here a short lock guards each map; unlike Envoy's shared data, a
//! key's first write is checked too (`None` means "still absent"), so no first-write race.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tollgate_core::quota::SharedBlobs;
use tollgate_core::{SharedCells, StoreError};

type Versioned<T> = HashMap<String, (T, u32)>;

/// Rate-limit cells and blobs (quota pools, denials) in this process's memory.
#[derive(Clone, Default)]
pub struct NativeCells {
    cells: Arc<Mutex<Versioned<u64>>>,
    blobs: Arc<Mutex<Versioned<Vec<u8>>>>,
}

impl NativeCells {
    /// The process's store: one per Envoy, shared by every configuration and worker.
    pub fn process() -> &'static NativeCells {
        static STORE: OnceLock<NativeCells> = OnceLock::new();
        STORE.get_or_init(NativeCells::default)
    }
}

/// A poisoned lock (a panic while it was held) is a store error, never a panic of our own.
fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    mutex.lock().map_err(|_| StoreError)
}

/// Write `value` at `key` if its version is still `version`; versions start at 1.
fn swap<T>(map: &mut Versioned<T>, key: &str, value: T, version: Option<u32>) -> bool {
    match (map.get_mut(key), version) {
        (None, None) => {
            map.insert(key.to_string(), (value, 1));
            true
        }
        (Some(slot), Some(expected)) if slot.1 == expected => {
            // 0 is never a version, so a wrapped counter cannot look like "no version".
            let next = slot.1.checked_add(1).unwrap_or(1);
            *slot = (value, next);
            true
        }
        _ => false,
    }
}

impl SharedCells for NativeCells {
    fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        Ok(lock(&self.cells)?.get(key).copied())
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: u64,
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        Ok(swap(&mut *lock(&self.cells)?, key, value, version))
    }
}

impl SharedBlobs for NativeCells {
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(lock(&self.blobs)?.get(key).cloned())
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        Ok(swap(&mut *lock(&self.blobs)?, key, value.to_vec(), version))
    }
}
