//! Tollgate's core: everything the filter decides, with no proxy-wasm dependency, so it is
//! tested natively with an injected clock. The filter crate is a thin adapter over [`Gate`].

// Slicing that can panic would take down the VM of every request on a worker.
#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod cache;
pub mod calls;
pub mod config;
pub mod context;
pub mod denials;
pub mod gate;
pub mod handover;
pub mod jwks;
pub mod meter;
pub mod pseudonym;
pub mod quota;
pub mod ratelimit;
pub mod refusal;
pub mod routes;
pub mod seats;
pub mod shipper;
pub mod token;

pub use config::{ConfigError, ConfigWarning, FeatureId, Policy};
pub use gate::{Admission, Gate, GateCounters, RequestHead, Verdict};
pub use meter::{Outcome, UsageKey, UsageTotals};
pub use ratelimit::{MemoryCells, SharedCells, StoreError};
pub use refusal::{Code, Refusal};
