//! The license server: signing keys kept in the store (generated or imported, published as a
//! JWKS, rotated, retired) and licenses issued with them.
//!
//! Rotation without a refused request: a new key is published at once but signs only from its
//! activation time, so filters that refresh their JWKS in between already know it when the first
//! license signed with it arrives. Filters also refetch on an unknown `kid` (rate-limited), so an
//! activation at once costs at most the first requests of each filter until that refetch lands.

use crate::errors::{conflict, invalid};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::signing::{random_kid, KeyAlg, SigningKey};
use crate::storage::{IssuedLicense, Store, StoredKey};

/// Default validity of an issued license.
pub const DEFAULT_VALID_DAYS: u64 = 365;

/// A key as the admin API shows it (never the private part).
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub alg: String,
    pub created_ms: u64,
    pub activates_ms: u64,
    pub retired_ms: Option<u64>,
    /// `pending` (published, not signing yet), `active`, or `retired`.
    pub state: &'static str,
    /// This key signs new licenses now.
    pub signing: bool,
    pub public_jwk: Value,
}

/// Add a key, generated (`private_pem` `None`) or imported, publishing it now and signing with
/// it from `now_ms + activate_in_ms`.
pub fn add_key(
    store: &dyn Store,
    alg: KeyAlg,
    kid: Option<&str>,
    private_pem: Option<&str>,
    activate_in_ms: u64,
    now_ms: u64,
) -> Result<KeyInfo> {
    let kid = kid.map_or_else(|| random_kid(alg), str::to_string);
    let key = match private_pem {
        None => SigningKey::generate(alg, &kid),
        Some(pem) => SigningKey::import(alg, &kid, pem),
    }
    .map_err(|e| invalid(format!("{e:#}")))?;
    let stored = StoredKey {
        kid: kid.clone(),
        alg: alg.name().to_string(),
        private_pem: key.file.private_pem.clone(),
        public_jwk: key.file.public_jwk.to_string(),
        created_ms: now_ms,
        activates_ms: now_ms.saturating_add(activate_in_ms),
        retired_ms: None,
    };
    if !store.add_signing_key(&stored)? {
        return Err(conflict(format!("a key with id `{kid}` exists")));
    }
    keys(store, now_ms)?
        .into_iter()
        .find(|k| k.kid == kid)
        .context("the key just added is missing")
}

/// Every key, oldest first, with its state at `now_ms`.
/// An issued license and why it is revoked, if it is: what the admin API and the CLI show.
#[derive(Debug, Clone, Serialize)]
pub struct ShownLicense {
    #[serde(flatten)]
    pub license: IssuedLicense,
    pub revoked: Option<String>,
}

/// The licenses issued here, of one account or all, with their revocations.
pub fn shown_licenses(store: &dyn Store, account: Option<&str>) -> Result<Vec<ShownLicense>> {
    with_revocations(store, store.issued_licenses(account)?)
}

/// One license issued here, with its revocation; `None` if it was not issued here.
pub fn shown_license(store: &dyn Store, license: &str) -> Result<Option<ShownLicense>> {
    let found: Vec<IssuedLicense> = store
        .issued_licenses(None)?
        .into_iter()
        .filter(|l| l.license == license)
        .collect();
    Ok(with_revocations(store, found)?.pop())
}

fn with_revocations(store: &dyn Store, licenses: Vec<IssuedLicense>) -> Result<Vec<ShownLicense>> {
    let ids: Vec<String> = licenses.iter().map(|l| l.license.clone()).collect();
    let mut restrictions = store.restrictions(&ids, &[])?;
    Ok(licenses
        .into_iter()
        .map(|license| ShownLicense {
            revoked: restrictions.revoked.remove(&license.license),
            license,
        })
        .collect())
}

pub fn keys(store: &dyn Store, now_ms: u64) -> Result<Vec<KeyInfo>> {
    let stored = store.signing_keys()?;
    let signer = signer_of(&stored, now_ms).map(|k| k.kid.clone());
    Ok(stored
        .into_iter()
        .map(|k| KeyInfo {
            signing: signer.as_deref() == Some(k.kid.as_str()),
            state: if k.retired_ms.is_some() {
                "retired"
            } else if k.activates_ms > now_ms {
                "pending"
            } else {
                "active"
            },
            public_jwk: serde_json::from_str(&k.public_jwk).unwrap_or(Value::Null),
            kid: k.kid,
            alg: k.alg,
            created_ms: k.created_ms,
            activates_ms: k.activates_ms,
            retired_ms: k.retired_ms,
        })
        .collect())
}

/// The key that signs now: the most recently activated of the keys not retired.
fn signer_of(keys: &[StoredKey], now_ms: u64) -> Option<&StoredKey> {
    keys.iter()
        .filter(|k| k.retired_ms.is_none() && k.activates_ms <= now_ms)
        .max_by_key(|k| (k.activates_ms, k.created_ms))
}

/// The public keys filters verify with: every key not retired, pending ones included.
pub fn jwks(store: &dyn Store) -> Result<Value> {
    let keys: Vec<Value> = store
        .signing_keys()?
        .into_iter()
        .filter(|k| k.retired_ms.is_none())
        .filter_map(|k| serde_json::from_str(&k.public_jwk).ok())
        .collect();
    Ok(json!({ "keys": keys }))
}

/// The key that signs now, ready to sign. The first key is generated (Ed25519) if there is
/// none at all.
pub fn signer(store: &dyn Store, now_ms: u64) -> Result<SigningKey> {
    let mut stored = store.signing_keys()?;
    if stored.is_empty() {
        add_key(store, KeyAlg::EdDSA, None, None, 0, now_ms)?;
        tracing::info!("no signing key yet: generated an Ed25519 key");
        stored = store.signing_keys()?;
    }
    let Some(active) = signer_of(&stored, now_ms) else {
        return Err(conflict(
            "no active signing key: every key is retired or not active yet",
        ));
    };
    let alg: KeyAlg = active.alg.parse()?;
    SigningKey::import(alg, &active.kid, &active.private_pem)
}

/// What to issue. Times are RFC 3339; the default validity is [`DEFAULT_VALID_DAYS`] from now.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseRequest {
    pub account: String,
    pub plan: String,
    #[serde(default)]
    pub features: Vec<String>,
    /// Overrides of the plan's limits (the `limits` claim the filter reads).
    #[serde(default)]
    pub limits: Option<Value>,
    /// Default: `lic_` and 64 random bits.
    #[serde(default)]
    pub license_id: Option<String>,
    #[serde(default)]
    pub not_before: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub valid_days: Option<u64>,
}

/// An issued license and its token (shown once; the collector does not keep it).
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    #[serde(flatten)]
    pub license: IssuedLicense,
    pub token: String,
}

/// Who signs: the `iss` and `aud` claims put into every license.
#[derive(Debug, Clone, Default)]
pub struct Issuer {
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 256 || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field}: 1-256 bytes without control characters"
        )));
    }
    Ok(())
}

fn rfc3339_ms(field: &str, text: &str) -> Result<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|_| invalid(format!("{field}: `{text}` is not an RFC 3339 time")))?;
    u64::try_from(t.timestamp_millis()).map_err(|_| invalid(format!("{field}: before 1970")))
}

/// Check `request`, sign it with the active key (the first key is generated, Ed25519, if
/// there is none), and record it.
pub fn issue(
    store: &dyn Store,
    issuer: &Issuer,
    known_plans: &[String],
    request: &LicenseRequest,
    now_ms: u64,
) -> Result<Issued> {
    check_name("account", &request.account)?;
    check_name("plan", &request.plan)?;
    if !known_plans.is_empty() && !known_plans.contains(&request.plan) {
        return Err(invalid(format!(
            "plan: `{}` is not in the plan catalogue (plans: {})",
            request.plan,
            known_plans.join(", ")
        )));
    }
    for feature in &request.features {
        check_name("features", feature)?;
    }
    if request.limits.as_ref().is_some_and(|l| !l.is_object()) {
        return Err(invalid(
            "limits: must be an object, as in the filter's plans.<plan> section",
        ));
    }
    let license_id = match &request.license_id {
        Some(id) => {
            check_name("license_id", id)?;
            id.clone()
        }
        None => {
            use rand::RngCore;
            let mut bytes = [0u8; 8];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            format!(
                "lic_{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            )
        }
    };
    let not_before_ms = match &request.not_before {
        Some(t) => rfc3339_ms("not_before", t)?,
        None => now_ms,
    };
    let expires_ms = match (&request.expires_at, request.valid_days) {
        (Some(_), Some(_)) => return Err(invalid("give expires_at or valid_days, not both")),
        (Some(t), None) => rfc3339_ms("expires_at", t)?,
        (None, days) => not_before_ms.saturating_add(
            days.unwrap_or(DEFAULT_VALID_DAYS)
                .saturating_mul(86_400_000),
        ),
    };
    if expires_ms <= not_before_ms || expires_ms <= now_ms {
        return Err(invalid(
            "the license would never be valid: it expires before it starts or before now",
        ));
    }

    let key = signer(store, now_ms)?;
    let (nbf, exp) = (not_before_ms / 1000, expires_ms / 1000);
    let mut claims = json!({
        "sub": request.account,
        "lid": license_id,
        "plan": request.plan,
        "features": request.features,
        "iat": now_ms / 1000,
        "nbf": nbf,
        "exp": exp,
    });
    if let Some(iss) = &issuer.issuer {
        claims["iss"] = json!(iss);
    }
    if let Some(aud) = &issuer.audience {
        claims["aud"] = json!(aud);
    }
    if let Some(limits) = &request.limits {
        claims["limits"] = limits.clone();
    }
    let token = key.sign(&claims)?;
    let license = IssuedLicense {
        license: license_id.clone(),
        account: request.account.clone(),
        plan: request.plan.clone(),
        features: request.features.clone(),
        limits: request.limits.clone(),
        not_before_ms: nbf * 1000,
        expires_ms: exp * 1000,
        kid: key.file.kid.clone(),
        issued_ms: now_ms,
        revoked_ms: None,
    };
    if !store.add_license(&license)? {
        return Err(conflict(format!("a license with id `{license_id}` exists")));
    }
    Ok(Issued { license, token })
}
