//! License signing keys: generate, save, load, publish as JWKS, and mint license tokens.

use std::path::Path;

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The signature algorithms Tollgate licenses use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlg {
    EdDSA,
    ES256,
    RS256,
}

impl std::str::FromStr for KeyAlg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "EdDSA" | "eddsa" | "Ed25519" | "ed25519" => Ok(KeyAlg::EdDSA),
            "ES256" | "es256" => Ok(KeyAlg::ES256),
            "RS256" | "rs256" => Ok(KeyAlg::RS256),
            other => bail!("unknown algorithm `{other}`: use EdDSA, ES256 or RS256"),
        }
    }
}

impl KeyAlg {
    /// The JOSE `alg` name.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::EdDSA => "EdDSA",
            KeyAlg::ES256 => "ES256",
            KeyAlg::RS256 => "RS256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            KeyAlg::EdDSA => Algorithm::EdDSA,
            KeyAlg::ES256 => Algorithm::ES256,
            KeyAlg::RS256 => Algorithm::RS256,
        }
    }
}

/// A private signing key with its id; what `keygen` writes to a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub kid: String,
    pub alg: KeyAlg,
    /// PKCS#8 PEM of the private key.
    pub private_pem: String,
    /// The public key as a JWK.
    pub public_jwk: Value,
}

/// A key ready to sign.
pub struct SigningKey {
    pub file: KeyFile,
    encoding: EncodingKey,
}

impl SigningKey {
    /// A new random key.
    pub fn generate(alg: KeyAlg, kid: &str) -> Result<SigningKey> {
        use rand::rngs::OsRng;
        let (private_pem, public_jwk) = match alg {
            KeyAlg::EdDSA => {
                use ed25519_dalek::pkcs8::EncodePrivateKey;
                let key = ed25519_dalek::SigningKey::generate(&mut OsRng);
                let pem = key.to_pkcs8_pem(Default::default())?.to_string();
                let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
                (pem, json!({"kty": "OKP", "crv": "Ed25519", "x": x}))
            }
            KeyAlg::ES256 => {
                use p256::pkcs8::EncodePrivateKey;
                let key = p256::ecdsa::SigningKey::random(&mut OsRng);
                let pem = key.to_pkcs8_pem(Default::default())?.to_string();
                let point = key.verifying_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    bail!("P-256 public key has no coordinates");
                };
                let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
                (pem, json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}))
            }
            KeyAlg::RS256 => {
                use rsa::pkcs8::EncodePrivateKey;
                use rsa::traits::PublicKeyParts;
                let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048)?;
                let pem = key.to_pkcs8_pem(Default::default())?.to_string();
                let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
                let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
                (pem, json!({"kty": "RSA", "n": n, "e": e}))
            }
        };
        let mut public_jwk = public_jwk;
        public_jwk["kid"] = json!(kid);
        public_jwk["alg"] = json!(alg.name());
        public_jwk["use"] = json!("sig");
        SigningKey::from_file(KeyFile {
            kid: kid.into(),
            alg,
            private_pem,
            public_jwk,
        })
    }

    pub fn from_file(file: KeyFile) -> Result<SigningKey> {
        let pem = file.private_pem.as_bytes();
        let encoding = match file.alg {
            KeyAlg::EdDSA => EncodingKey::from_ed_pem(pem),
            KeyAlg::ES256 => EncodingKey::from_ec_pem(pem),
            KeyAlg::RS256 => EncodingKey::from_rsa_pem(pem),
        }
        .context("the private key does not fit its algorithm")?;
        Ok(SigningKey { file, encoding })
    }

    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        let file: KeyFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Tollgate key file", path.display()))?;
        SigningKey::from_file(file)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(&self.file)?)
            .with_context(|| format!("writing key file {}", path.display()))
    }

    /// Sign `claims` as a JWT with this key's `kid` and algorithm.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        let mut header = Header::new(self.file.alg.jwt());
        header.kid = Some(self.file.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    /// Sign raw JSON texts as they are (for tests of duplicated or odd claims).
    pub fn sign_raw(&self, header_json: &str, claims_json: &str) -> Result<String> {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header_json),
            URL_SAFE_NO_PAD.encode(claims_json)
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.file.alg.jwt())?;
        Ok(format!("{message}.{signature}"))
    }

    /// Sign with an explicit header (for tests that forge headers).
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> Result<String> {
        Ok(jsonwebtoken::encode(header, claims, &self.encoding)?)
    }
}

/// The public JWKS of `keys`.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> Value {
    json!({"keys": keys.into_iter().map(|k| k.file.public_jwk.clone()).collect::<Vec<_>>()})
}

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
