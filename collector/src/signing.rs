//! License signing keys: generate (Ed25519 by default), import (Ed25519, ES256, RS256 PKCS#8
//! PEM), publish as a JWK, and sign tokens. The devkit re-exports this for its minting CLI
//! and tests, so there is one implementation of what a Tollgate license key is.

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

/// A private signing key with its id: what `keygen` writes to a file and the collector stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyFile {
    pub kid: String,
    pub alg: KeyAlg,
    /// PKCS#8 PEM of the private key.
    pub private_pem: String,
    /// The public key as a JWK (with `kid`, `alg` and `use`).
    pub public_jwk: Value,
}

/// A key ready to sign.
pub struct SigningKey {
    pub file: KeyFile,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.file.kid)
            .field("alg", &self.file.alg)
            .finish()
    }
}

/// A key id no one chose: the algorithm and 64 random bits.
pub fn random_kid(alg: KeyAlg) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{}-{}",
        alg.name().to_ascii_lowercase(),
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

impl SigningKey {
    /// A new random key.
    pub fn generate(alg: KeyAlg, kid: &str) -> Result<SigningKey> {
        use rand::rngs::OsRng;
        let private_pem = match alg {
            KeyAlg::EdDSA => {
                use ed25519_dalek::pkcs8::EncodePrivateKey;
                let key = ed25519_dalek::SigningKey::generate(&mut OsRng);
                key.to_pkcs8_pem(Default::default())?.to_string()
            }
            KeyAlg::ES256 => {
                use p256::pkcs8::EncodePrivateKey;
                let key = p256::ecdsa::SigningKey::random(&mut OsRng);
                key.to_pkcs8_pem(Default::default())?.to_string()
            }
            KeyAlg::RS256 => {
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048)?;
                key.to_pkcs8_pem(Default::default())?.to_string()
            }
        };
        SigningKey::import(alg, kid, &private_pem)
    }

    /// A key from its PKCS#8 PEM; the public JWK is derived from it.
    pub fn import(alg: KeyAlg, kid: &str, private_pem: &str) -> Result<SigningKey> {
        if kid.is_empty() || kid.len() > 128 || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("a key id is 1-128 printable ASCII characters without spaces");
        }
        let public_jwk = match alg {
            KeyAlg::EdDSA => {
                use ed25519_dalek::pkcs8::DecodePrivateKey;
                let key = ed25519_dalek::SigningKey::from_pkcs8_pem(private_pem)
                    .context("not an Ed25519 private key in PKCS#8 PEM")?;
                let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
                json!({"kty": "OKP", "crv": "Ed25519", "x": x})
            }
            KeyAlg::ES256 => {
                use p256::pkcs8::DecodePrivateKey;
                let key = p256::ecdsa::SigningKey::from_pkcs8_pem(private_pem)
                    .context("not a P-256 private key in PKCS#8 PEM")?;
                let point = key.verifying_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    bail!("P-256 public key has no coordinates");
                };
                let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
                json!({"kty": "EC", "crv": "P-256", "x": x, "y": y})
            }
            KeyAlg::RS256 => {
                use rsa::pkcs8::DecodePrivateKey;
                use rsa::traits::PublicKeyParts;
                let key = rsa::RsaPrivateKey::from_pkcs8_pem(private_pem)
                    .context("not an RSA private key in PKCS#8 PEM")?;
                if key.size() < 256 {
                    bail!("an RSA key needs at least 2048 bits");
                }
                let n = URL_SAFE_NO_PAD.encode(key.n().to_bytes_be());
                let e = URL_SAFE_NO_PAD.encode(key.e().to_bytes_be());
                json!({"kty": "RSA", "n": n, "e": e})
            }
        };
        let mut public_jwk = public_jwk;
        public_jwk["kid"] = json!(kid);
        public_jwk["alg"] = json!(alg.name());
        public_jwk["use"] = json!("sig");
        SigningKey::from_file(KeyFile {
            kid: kid.into(),
            alg,
            private_pem: private_pem.to_string(),
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

    pub fn load(path: &std::path::Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        let file: KeyFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a Tollgate key file", path.display()))?;
        SigningKey::from_file(file)
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_imported_key_publishes_the_same_public_key_as_the_generated_one() {
        for alg in [KeyAlg::EdDSA, KeyAlg::ES256] {
            let key = SigningKey::generate(alg, "k1").unwrap();
            let again = SigningKey::import(alg, "k1", &key.file.private_pem).unwrap();
            assert_eq!(key.file.public_jwk, again.file.public_jwk);
            assert_eq!(again.file.public_jwk["alg"], alg.name());
        }
        let ed = SigningKey::generate(KeyAlg::EdDSA, "k1").unwrap();
        assert!(SigningKey::import(KeyAlg::ES256, "k2", &ed.file.private_pem).is_err());
        assert!(SigningKey::import(KeyAlg::EdDSA, "has space", &ed.file.private_pem).is_err());
        assert!(random_kid(KeyAlg::EdDSA).starts_with("eddsa-"));
    }
}
