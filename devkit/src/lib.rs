//! Tollgate's developer kit: license keys and minting, a local upstream, an Envoy runner,
//! and the demo. Shared by the CLI tools, the demo and the tests.

pub mod keys;

pub use keys::{jwks, unix_now, KeyAlg, KeyFile, LicenseSpec, SigningKey};
pub mod envoy;
pub mod oci;
pub mod periods;
pub mod ports;
pub mod postgres;
pub mod upstream;

pub use envoy::{Adapter, Bootstrap, Envoy};
pub use postgres::TestPostgres;
pub use upstream::Upstream;
