//! License tokens: the JWKS, signature checks with a pinned algorithm per key, and the claims
//! that make a [`License`].

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{
    CompiledLimits, ConfigError, FeatureId, LimitsConfig, Plan, Policy, UserSource,
};
use crate::pseudonym::Subject;
use crate::refusal::Code;

/// A JSON Web Key Set as written in the configuration (RFC 7517).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwks {
    pub keys: Vec<JwkConfig>,
}

/// A fetched JWKS: members besides `keys` are ignored.
#[derive(Debug, Deserialize)]
struct RemoteJwks {
    keys: Vec<JwkConfig>,
}

/// One public key. Unknown JWK members (`x5c`, `key_ops`, ...) are ignored.
#[derive(Debug, Deserialize)]
pub struct JwkConfig {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
}

/// A verification key with the one algorithm it accepts.
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    decoding: DecodingKey,
    validation: Validation,
    /// Ed25519 keys, decompressed once: the library would decompress the point on every
    /// verification (a square root in the field, a large share of a verification's cost).
    ed25519: Option<ed25519_dalek::VerifyingKey>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish()
    }
}

/// The configured keys, looked up by `kid`.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<VerifyingKey>,
}

fn b64_len(field: &str, value: &Option<String>) -> Result<usize, ConfigError> {
    let Some(value) = value else {
        return Err(ConfigError::new(field, "missing"));
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map(|bytes| bytes.len())
        .map_err(|_| ConfigError::new(field, "not base64url"))
}

impl KeySet {
    /// Compile a JWKS; every key must pin one of EdDSA (Ed25519), ES256 or RS256.
    pub fn from_jwks(jwks: &Jwks) -> Result<KeySet, ConfigError> {
        if jwks.keys.is_empty() {
            return Err(ConfigError::new(
                "token.jwks.keys",
                "at least one key is needed",
            ));
        }
        let mut keys: Vec<VerifyingKey> = Vec::with_capacity(jwks.keys.len());
        for (i, jwk) in jwks.keys.iter().enumerate() {
            let at = format!("token.jwks.keys[{i}]");
            let key = compile_jwk(&at, jwk)?;
            if jwks.keys.len() > 1 && key.kid.is_none() {
                return Err(ConfigError::new(
                    format!("{at}.kid"),
                    "every key needs a `kid` when the set has more than one",
                ));
            }
            if keys.iter().any(|k| k.kid.is_some() && k.kid == key.kid) {
                return Err(ConfigError::new(format!("{at}.kid"), "duplicate key id"));
            }
            keys.push(key);
        }
        Ok(KeySet { keys })
    }

    /// Compile a JWKS fetched from an endpoint. Unlike the configuration's, it may hold keys
    /// Tollgate does not verify with (encryption keys, other curves, keys without `kid`):
    /// those are skipped and named; at least one usable key is needed.
    pub fn from_remote_jwks(body: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let jwks: RemoteJwks =
            serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys: Vec<VerifyingKey> = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in jwks.keys.iter().enumerate() {
            let name = jwk.kid.clone().unwrap_or_else(|| format!("keys[{i}]"));
            match compile_jwk(&format!("keys[{i}]"), jwk) {
                Ok(key) if key.kid.is_none() && jwks.keys.len() > 1 => {
                    skipped.push(format!("{name}: no kid in a set of several keys"))
                }
                Ok(key) if keys.iter().any(|k| k.kid == key.kid) => {
                    skipped.push(format!("{name}: duplicate kid"))
                }
                Ok(key) => keys.push(key),
                Err(e) => skipped.push(format!("{name}: {}", e.problem)),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable key in the JWKS ({})",
                if skipped.is_empty() {
                    "it is empty".to_string()
                } else {
                    skipped.join("; ")
                }
            ));
        }
        Ok((KeySet { keys }, skipped))
    }

    /// An empty set: the configuration's when keys come from `jwks_source` only.
    pub fn empty() -> KeySet {
        KeySet { keys: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn find(&self, kid: Option<&str>) -> Option<&VerifyingKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // A token without `kid` is accepted only when there is a single key to choose.
            None => match self.keys.as_slice() {
                [only] => Some(only),
                _ => None,
            },
        }
    }
}

fn compile_jwk(at: &str, jwk: &JwkConfig) -> Result<VerifyingKey, ConfigError> {
    if let Some(use_) = &jwk.use_ {
        if use_ != "sig" {
            return Err(ConfigError::new(
                format!("{at}.use"),
                "only `sig` keys verify tokens",
            ));
        }
    }
    let implied = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("OKP", Some("Ed25519")) => Algorithm::EdDSA,
        ("EC", Some("P-256")) => Algorithm::ES256,
        ("RSA", None) => Algorithm::RS256,
        ("oct", _) => {
            return Err(ConfigError::new(
                format!("{at}.kty"),
                "symmetric (`oct`) keys are not accepted: license tokens must be signed with a private key",
            ))
        }
        (kty, crv) => {
            return Err(ConfigError::new(
                format!("{at}.kty"),
                format!(
                    "unsupported key type `{kty}`{}: use OKP/Ed25519, EC/P-256 or RSA",
                    crv.map(|c| format!(" with curve `{c}`")).unwrap_or_default()
                ),
            ))
        }
    };
    if let Some(alg) = &jwk.alg {
        let named = match alg.as_str() {
            "EdDSA" | "Ed25519" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            "RS256" => Algorithm::RS256,
            other => {
                return Err(ConfigError::new(
                    format!("{at}.alg"),
                    format!("unsupported algorithm `{other}`: use EdDSA, ES256 or RS256"),
                ))
            }
        };
        if named != implied {
            return Err(ConfigError::new(
                format!("{at}.alg"),
                format!("`{alg}` does not fit a `{}` key", jwk.kty),
            ));
        }
    }
    let mut ed25519 = None;
    let decoding = match implied {
        Algorithm::EdDSA => {
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwk.x.as_deref().unwrap_or_default().trim_end_matches('='))
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    ConfigError::new(format!("{at}.x"), "an Ed25519 key is 32 bytes of base64url")
                })?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map_err(|_| ConfigError::new(format!("{at}.x"), "not a point of Ed25519"))?;
            if key.is_weak() {
                return Err(ConfigError::new(
                    format!("{at}.x"),
                    "a weak (small-order) Ed25519 key verifies forged signatures",
                ));
            }
            ed25519 = Some(key);
            DecodingKey::from_ed_components(jwk.x.as_deref().unwrap_or_default())
        }
        Algorithm::ES256 => {
            let xl = b64_len(&format!("{at}.x"), &jwk.x)?;
            let yl = b64_len(&format!("{at}.y"), &jwk.y)?;
            if xl != 32 || yl != 32 {
                return Err(ConfigError::new(
                    format!("{at}.x"),
                    "P-256 coordinates are 32 bytes each",
                ));
            }
            DecodingKey::from_ec_components(
                jwk.x.as_deref().unwrap_or_default(),
                jwk.y.as_deref().unwrap_or_default(),
            )
        }
        _ => {
            let n_len = b64_len(&format!("{at}.n"), &jwk.n)?;
            b64_len(&format!("{at}.e"), &jwk.e)?;
            if n_len < 256 {
                return Err(ConfigError::new(
                    format!("{at}.n"),
                    "RSA keys shorter than 2048 bits are not accepted",
                ));
            }
            DecodingKey::from_rsa_components(
                jwk.n.as_deref().unwrap_or_default(),
                jwk.e.as_deref().unwrap_or_default(),
            )
        }
    }
    .map_err(|e| ConfigError::new(at, format!("unusable key: {e}")))?;

    // Time, issuer and audience are checked by `verify` against the proxy's clock; the
    // library's own checks would read the WASI clock instead.
    let mut validation = Validation::new(implied);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    Ok(VerifyingKey {
        kid: jwk.kid.clone(),
        alg: implied,
        decoding,
        validation,
        ed25519,
    })
}

/// Check an ES256 or RS256 token with `jsonwebtoken` and decode its claims.
fn decode_with_library(key: &VerifyingKey, token: &str) -> Result<LicenseClaims, TokenError> {
    jsonwebtoken::decode::<LicenseClaims>(token, &key.decoding, &key.validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => TokenError::new(
                Code::InvalidLicense,
                "the token's claims are not a valid license (need sub, lid, plan, exp)",
            ),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                TokenError::new(Code::InvalidToken, "the token's signature does not verify")
            }
            _ => TokenError::new(Code::InvalidToken, "the token is not a well-formed JWT"),
        })
}

/// Check an EdDSA token against a decompressed key and decode its claims: what
/// `jsonwebtoken::decode` does, minus decompressing the key and parsing the header again.
/// Strict verification (RFC 8032 with canonical encodings, no small-order points).
fn decode_eddsa(
    key: &ed25519_dalek::VerifyingKey,
    token: &str,
) -> Result<LicenseClaims, TokenError> {
    let malformed = || TokenError::new(Code::InvalidToken, "the token is not a well-formed JWT");
    let (signed, signature) = token.rsplit_once('.').ok_or_else(malformed)?;
    let (_header, payload) = signed.split_once('.').ok_or_else(malformed)?;
    if payload.contains('.') {
        return Err(malformed());
    }
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signature = b64
        .decode(signature)
        .ok()
        .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
        .ok_or_else(malformed)?;
    key.verify_strict(
        signed.as_bytes(),
        &ed25519_dalek::Signature::from_bytes(&signature),
    )
    .map_err(|_| TokenError::new(Code::InvalidToken, "the token's signature does not verify"))?;
    let payload = b64.decode(payload).map_err(|_| malformed())?;
    serde_json::from_slice(&payload).map_err(|_| {
        TokenError::new(
            Code::InvalidLicense,
            "the token's claims are not a valid license (need sub, lid, plan, exp)",
        )
    })
}

/// `aud` is a string or a list of strings (RFC 7519 section 4.1.3).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims of a license token.
#[derive(Debug, Deserialize)]
struct LicenseClaims {
    sub: String,
    lid: String,
    plan: String,
    #[serde(default)]
    features: Vec<String>,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    limits: Option<LimitsConfig>,
}

/// Features a license entitles, as a bit set over [`Policy::features`]: the first 64 inline
/// (no allocation per license), any further ones in `more`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureSet {
    first: u64,
    more: Vec<u64>,
}

impl FeatureSet {
    pub fn insert(&mut self, feature: FeatureId) {
        let (word, bit) = (usize::from(feature) / 64, feature % 64);
        let Some(more) = word.checked_sub(1) else {
            self.first |= 1 << bit;
            return;
        };
        if self.more.len() <= more {
            self.more.resize(more + 1, 0);
        }
        if let Some(w) = self.more.get_mut(more) {
            *w |= 1 << bit;
        }
    }

    pub fn contains(&self, feature: FeatureId) -> bool {
        let (word, bit) = (usize::from(feature) / 64, feature % 64);
        let w = match word.checked_sub(1) {
            None => self.first,
            Some(more) => self.more.get(more).copied().unwrap_or(0),
        };
        w & (1 << bit) != 0
    }
}

/// A verified license: who it is for and what it allows. One is cached per license a worker
/// serves, so it is kept small: the plan's limits are shared unless the license overrides
/// them, and per-feature keys exist only for licenses with per-feature limits.
#[derive(Debug)]
pub struct License {
    pub account: Arc<str>,
    pub license_id: Arc<str>,
    pub plan: Arc<Plan>,
    pub features: FeatureSet,
    pub limits: Arc<CompiledLimits>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// Shared-data key of the license-wide rate state.
    pub rate_key: Box<str>,
    /// Shared-data keys of per-feature rate states, indexed by [`FeatureId`]; empty when the
    /// license has no per-feature limit.
    pub feature_rate_keys: Box<[Option<Box<str>>]>,
    /// The end user (`users.claim`), pseudonymised when the token is verified: the raw value
    /// is not kept.
    pub user: Option<Arc<str>>,
    /// The `upstream_headers.combined` value per feature of the license, indexed by
    /// [`FeatureId`] (empty when no combined header is configured): made once here, so a
    /// request formats nothing.
    pub combined_context: Box<[Option<Box<str>>]>,
}

/// Why a token was refused: the refusal code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub code: Code,
    pub message: String,
    /// The token names a `kid` no key has: fetched keys may be stale.
    pub unknown_key: bool,
}

impl TokenError {
    fn new(code: Code, message: impl Into<String>) -> Self {
        TokenError {
            code,
            message: message.into(),
            unknown_key: false,
        }
    }
}

/// Header parameters RFC 7515 and RFC 7518 define for a JWS, and RFC 7516's for a JWE: a
/// `crit` list naming one of them is malformed (RFC 7515 section 4.1.11).
const REGISTERED_HEADER_PARAMETERS: [&str; 13] = [
    "alg", "jku", "jwk", "kid", "x5u", "x5c", "x5t", "x5t#S256", "typ", "cty", "crit", "enc", "zip",
];

/// Decode a compact JWS's protected header and refuse what a recipient must refuse before it
/// looks at the signature: a header that is not one JSON object (duplicate registered members
/// included), and any `crit` (RFC 7515 section 4.1.11). No extension is understood here, so a
/// well-formed `crit` is refused too: the signer said the token means something this verifier
/// cannot check. Shared by every verifier of tokens (the collector's account tokens too).
pub fn jose_header(token: &str) -> Result<jsonwebtoken::Header, TokenError> {
    let malformed = || TokenError::new(Code::InvalidToken, "the token is not a well-formed JWT");
    let header = jsonwebtoken::decode_header(token).map_err(|_| malformed())?;
    // The library reads `"crit": null` as no `crit`: look at the member as written.
    let encoded = token.split('.').next().unwrap_or_default();
    let probe: CritProbe = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or_else(malformed)?;
    let Some(crit) = probe.crit else {
        return Ok(header);
    };
    let names: Option<Vec<&str>> = match &crit {
        serde_json::Value::Array(items) if !items.is_empty() => {
            items.iter().map(serde_json::Value::as_str).collect()
        }
        _ => None,
    };
    let well_formed = names.is_some_and(|names| {
        names.iter().enumerate().all(|(i, name)| {
            !name.is_empty()
                && !REGISTERED_HEADER_PARAMETERS.contains(name)
                && header.extras.inner().contains_key(*name)
                && !names.iter().skip(i + 1).any(|other| other == name)
        })
    });
    Err(TokenError::new(
        Code::InvalidToken,
        if well_formed {
            "the token names critical header extensions (`crit`) this verifier does not understand"
        } else {
            "the token's `crit` header is malformed (RFC 7515 section 4.1.11)"
        },
    ))
}

/// The `crit` member of a JOSE header as written: absent, or any JSON value (`null` included).
#[derive(Deserialize)]
struct CritProbe {
    #[serde(default, deserialize_with = "present")]
    crit: Option<serde_json::Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

/// Verify a token's signature and claims at `now` (seconds since the Unix epoch), with the
/// configuration's keys and the `fetched` ones.
pub fn verify(
    policy: &Policy,
    fetched: Option<&KeySet>,
    token: &str,
    now: u64,
) -> Result<License, TokenError> {
    let tp = &policy.token;
    if token.len() > tp.max_token_bytes {
        return Err(TokenError::new(
            Code::InvalidToken,
            "the token is too large",
        ));
    }
    let header = jose_header(token)?;
    let kid = header.kid.as_deref();
    let key = match kid {
        Some(_) => tp
            .keys
            .find(kid)
            .or_else(|| fetched.and_then(|f| f.find(kid))),
        // Without `kid`, only when there is a single key to choose.
        None if tp.keys.len() + fetched.map_or(0, KeySet::len) == 1 => tp
            .keys
            .find(None)
            .or_else(|| fetched.and_then(|f| f.find(None))),
        None => None,
    };
    let key = key.ok_or_else(|| TokenError {
        unknown_key: kid.is_some(),
        ..TokenError::new(
            Code::InvalidToken,
            "the token is not signed with a configured key",
        )
    })?;
    if header.alg != key.alg {
        return Err(TokenError::new(
            Code::InvalidToken,
            "the token's algorithm is not the one its key is pinned to",
        ));
    }
    let claims = match &key.ed25519 {
        Some(ed25519) => decode_eddsa(ed25519, token)?,
        None => decode_with_library(key, token)?,
    };

    if claims.exp.saturating_add(tp.leeway_seconds) < now {
        return Err(TokenError::new(
            Code::TokenExpired,
            "the license token has expired",
        ));
    }
    if claims
        .nbf
        .is_some_and(|nbf| nbf > now.saturating_add(tp.leeway_seconds))
    {
        return Err(TokenError::new(
            Code::TokenNotYetValid,
            "the license token is not valid yet",
        ));
    }
    if !tp.issuers.is_empty()
        && !claims
            .iss
            .as_ref()
            .is_some_and(|iss| tp.issuers.contains(iss))
    {
        return Err(TokenError::new(
            Code::InvalidIssuer,
            "the token's issuer is not accepted",
        ));
    }
    if !tp.audiences.is_empty() {
        let accepted = match &claims.aud {
            Some(Audience::One(a)) => tp.audiences.contains(a),
            Some(Audience::Many(list)) => list.iter().any(|a| tp.audiences.contains(a)),
            None => false,
        };
        if !accepted {
            return Err(TokenError::new(
                Code::InvalidAudience,
                "the token is not meant for this audience",
            ));
        }
    }
    if claims.sub.is_empty()
        || claims.lid.is_empty()
        || claims.sub.len() > 256
        || claims.lid.len() > 256
        || claims.sub.chars().any(char::is_control)
        || claims.lid.chars().any(char::is_control)
    {
        return Err(TokenError::new(
            Code::InvalidLicense,
            "the license's `sub` and `lid` must be 1-256 bytes without control characters",
        ));
    }
    let plan = policy.plans.get(&claims.plan).ok_or_else(|| {
        TokenError::new(Code::UnknownPlan, "the license's plan is not offered here")
    })?;

    let mut features = FeatureSet::default();
    for name in &claims.features {
        if let Some(id) = policy.features.iter().position(|f| f == name) {
            features.insert(FeatureId::try_from(id).unwrap_or(FeatureId::MAX));
        }
    }
    if claims.limits.as_ref().is_some_and(|l| l.sharing.is_some()) {
        return Err(TokenError::new(
            Code::InvalidLicense,
            "the license's limits.sharing: sharing detection is set by the plan",
        ));
    }
    if claims.limits.as_ref().is_some_and(|l| l.seats.is_some())
        && (policy.users.is_none() || policy.collector.is_none())
    {
        return Err(TokenError::new(
            Code::InvalidLicense,
            "the license's limits.seats: this API does not tell users apart (no `users` or no `collector` in the filter's configuration)",
        ));
    }
    let user = match (&policy.users, &policy.pseudonyms) {
        (Some(UserSource::Claim(name)), Some(pseudonyms)) => {
            user_claim(token, name).map(|raw| Arc::from(pseudonyms.pseudonym(Subject::User, &raw)))
        }
        _ => None,
    };
    let limits = match &claims.limits {
        None => Arc::clone(&plan.limits),
        Some(overrides) => Arc::new(
            plan.limits
                .overridden("limits", overrides, &policy.features)
                .map_err(|e| TokenError::new(Code::InvalidLicense, format!("the license's {e}")))?,
        ),
    };
    // Length-prefixed so no license id can spell another license's feature key
    // (`lic-a/design` vs `lic-a` + feature `design`); feature names cannot contain `/`.
    let rate_key = format!("tollgate/rl/{}:{}", claims.lid.len(), claims.lid);
    let feature_rate_keys = if limits.per_feature.iter().any(Option::is_some) {
        limits
            .per_feature
            .iter()
            .enumerate()
            // Named by feature, not index: indexes change when routes are reordered on a reload.
            .map(|(id, quota)| {
                quota.map(|_| {
                    format!("{rate_key}/{}", policy.features.get(id).map_or("", |f| f))
                        .into_boxed_str()
                })
            })
            .collect()
    } else {
        Box::default()
    };
    let combined_context = if policy.upstream_headers.combined.is_some() {
        (0..policy.features.len())
            .map(|id| {
                let feature = FeatureId::try_from(id).ok()?;
                features.contains(feature).then(|| {
                    crate::context::combined(&crate::context::fields(
                        &claims.sub,
                        &claims.lid,
                        &plan.name,
                        policy.feature_name(feature),
                    ))
                    .into_boxed_str()
                })
            })
            .collect()
    } else {
        Box::default()
    };
    Ok(License {
        account: claims.sub.into(),
        license_id: claims.lid.into(),
        plan: Arc::clone(plan),
        features,
        limits,
        expires_at: claims.exp,
        rate_key: rate_key.into_boxed_str(),
        feature_rate_keys,
        user,
        combined_context,
    })
}

/// The user claim `name` of a verified token: a non-empty string (at most 256 bytes) or an
/// integer. Read from the payload again, only when a user claim is configured.
fn user_claim(token: &str, name: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    match claims.get(name)? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_sets_hold_features_beyond_the_first_word() {
        let mut set = FeatureSet::default();
        for feature in [0, 63, 64, 200] {
            set.insert(feature);
        }
        for feature in [0, 63, 64, 200] {
            assert!(set.contains(feature), "{feature}");
        }
        for feature in [1, 62, 65, 199, 201, FeatureId::MAX] {
            assert!(!set.contains(feature), "{feature}");
        }
    }
}
