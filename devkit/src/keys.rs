//! License signing keys: generate, save, load, publish as JWKS, and mint license tokens.

use anyhow::Result;
use serde_json::{json, Value};

pub use tollgate_collector::signing::{jwks, KeyAlg, KeyFile, SigningKey};

/// What a license says; `mint` turns it into claims.
#[derive(Debug, Clone)]
pub struct LicenseSpec {
    pub account: String,
    pub license_id: String,
    pub plan: String,
    pub features: Vec<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Seconds of validity from now.
    pub ttl_seconds: u64,
    /// Optional per-license limit overrides, as the `limits` claim.
    pub limits: Option<Value>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl LicenseSpec {
    pub fn new(account: &str, license_id: &str, plan: &str, features: &[&str]) -> Self {
        LicenseSpec {
            account: account.into(),
            license_id: license_id.into(),
            plan: plan.into(),
            features: features.iter().map(|f| f.to_string()).collect(),
            issuer: None,
            audience: None,
            ttl_seconds: 3600,
            limits: None,
        }
    }

    /// The JWT claims, issued at `now` (Unix seconds).
    pub fn claims_at(&self, now: u64) -> Value {
        let mut claims = json!({
            "sub": self.account,
            "lid": self.license_id,
            "plan": self.plan,
            "features": self.features,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_seconds,
        });
        if let Some(iss) = &self.issuer {
            claims["iss"] = json!(iss);
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = json!(aud);
        }
        if let Some(limits) = &self.limits {
            claims["limits"] = limits.clone();
        }
        claims
    }

    /// A signed license token valid from now.
    pub fn mint(&self, key: &SigningKey) -> Result<String> {
        key.sign(&self.claims_at(unix_now()))
    }
}

/// One key of each algorithm (kids `ed-1`, `es-1`, `rs-1`), for tests.
pub struct KeyTrio {
    pub ed: SigningKey,
    pub es: SigningKey,
    pub rs: SigningKey,
}

/// The test keys, generated once per process: RSA key generation is slow.
pub fn test_keys() -> Result<&'static KeyTrio> {
    static KEYS: std::sync::OnceLock<std::result::Result<KeyTrio, String>> =
        std::sync::OnceLock::new();
    let generated = KEYS.get_or_init(|| {
        let generate = || -> Result<KeyTrio> {
            Ok(KeyTrio {
                ed: SigningKey::generate(KeyAlg::EdDSA, "ed-1")?,
                es: SigningKey::generate(KeyAlg::ES256, "es-1")?,
                rs: SigningKey::generate(KeyAlg::RS256, "rs-1")?,
            })
        };
        generate().map_err(|e| e.to_string())
    });
    generated
        .as_ref()
        .map_err(|e| anyhow::anyhow!("generating test keys: {e}"))
}
