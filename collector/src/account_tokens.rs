//! Account tokens: JWTs signed with the license signing key, for the audience
//! `tollgate:account-api` with the scope `account:read`, that let a customer read their own
//! account (the HTTP API's account routes). They cannot pass for a license (no `lid` or `plan`),
//! and a license cannot pass for one (wrong audience, no scope).

use anyhow::Result;
use jsonwebtoken::{jwk::Jwk, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::json;

use crate::storage::Store;

/// The audience of account tokens.
pub const ACCOUNT_AUDIENCE: &str = "tollgate:account-api";

pub const ACCOUNT_SCOPE: &str = "account:read";

/// Default validity of an account token.
pub const DEFAULT_TOKEN_DAYS: u64 = 30;

/// Sign a token for `account`'s read-only view.
pub fn issue_account_token(
    store: &dyn Store,
    issuer: &crate::licensing::Issuer,
    account: &str,
    valid_days: u64,
    now_ms: u64,
) -> Result<(String, u64)> {
    let key = crate::licensing::signer(store, now_ms)?;
    let exp = now_ms / 1000 + valid_days.clamp(1, 366) * 86_400;
    let mut random = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
    let token = key.sign(&json!({
        "iss": issuer.issuer.as_deref().unwrap_or("tollgate"),
        "aud": ACCOUNT_AUDIENCE,
        "sub": account,
        "scope": ACCOUNT_SCOPE,
        "iat": now_ms / 1000,
        "exp": exp,
        "jti": random.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    }))?;
    Ok((token, exp * 1000))
}

#[derive(Deserialize)]
struct AccountClaims {
    sub: String,
    scope: String,
}

/// The account a token is scoped to, if it is a valid account token signed with a key that is
/// not retired.
pub fn verify_account_token(store: &dyn Store, token: &str) -> Option<String> {
    // The filter's header check (`crit` refused, RFC 7515 section 4.1.11), so both verifiers
    // refuse the same tokens.
    let header = tollgate_core::token::jose_header(token).ok()?;
    let kid = header.kid?;
    let stored = store
        .signing_keys()
        .ok()?
        .into_iter()
        .find(|k| k.kid == kid && k.retired_ms.is_none())?;
    let jwk: Jwk = serde_json::from_str(&stored.public_jwk).ok()?;
    let alg: jsonwebtoken::Algorithm = stored.alg.parse().ok()?;
    if header.alg != alg {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    let mut validation = Validation::new(alg);
    validation.set_audience(&[ACCOUNT_AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<AccountClaims>(token, &key, &validation)
        .ok()?
        .claims;
    (claims.scope == ACCOUNT_SCOPE && !claims.sub.is_empty()).then_some(claims.sub)
}
