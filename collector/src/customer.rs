//! What customers see: a read-only view of one account (usage, cost so far and the forecast,
//! quotas, the invoice draft), for a bearer token scoped to that account, and the dashboard
//! page that draws it.
//!
//! Account tokens are JWTs signed with the license signing key, for the audience
//! `tollgate:account-api` with the scope `account:read`. They cannot pass for a license (no
//! `lid` or `plan`), and a license cannot pass for one (wrong audience, no scope).

use std::sync::Arc;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{jwk::Jwk, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::json;

use crate::server::{admin_refusal, log, refusal};
use crate::store::{Granularity, Store, UsageQuery};
use crate::AppState;

/// The audience of account tokens.
pub const ACCOUNT_AUDIENCE: &str = "tollgate:account-api";
const ACCOUNT_SCOPE: &str = "account:read";
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

/// Who calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Account(String),
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The caller, if the request carries the admin token or an account token.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    if admin_refusal(state, headers).is_none() {
        return Some(Caller::Admin);
    }
    let token = bearer(headers)?;
    verify_account_token(state.store.as_ref(), token).map(Caller::Account)
}

fn unauthorized() -> Response {
    refusal(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "needs `authorization: Bearer <admin token or a token of this account>`",
    )
}

/// Run `work` for a caller allowed to read `account`: the admin, or the account's own token.
async fn for_account(
    state: Arc<AppState>,
    headers: HeaderMap,
    account: String,
    work: impl FnOnce(&AppState, &str, u64) -> Result<Response> + Send + 'static,
) -> Response {
    let worker = Arc::clone(&state);
    let done = tokio::task::spawn_blocking(move || {
        match caller(&worker, &headers) {
            Some(Caller::Admin) => {}
            Some(Caller::Account(a)) if a == account => {}
            _ => return Ok(unauthorized()),
        }
        let now = worker.clock.now_ms();
        work(&worker, &account, now)
    })
    .await;
    match done {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e:#}"),
        ),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// The routes of this module, merged into [`crate::app`].
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/accounts/{account}/tokens", post(new_token))
        .route("/v1/accounts/{account}/usage", get(account_usage))
        .route("/v1/accounts/{account}/cost", get(account_cost))
        .route("/v1/accounts/{account}/quotas", get(account_quotas))
        .route("/v1/accounts/{account}/users", get(account_users))
        .route("/v1/accounts/{account}/licenses", get(account_licenses))
        .route("/v1/refusal-codes", get(refusal_codes))
        .route("/dashboard", get(dashboard))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    valid_days: Option<u64>,
}

async fn new_token(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let ask: NewToken = match crate::admin::json_body(&body, r#"{"valid_days": 1-366}"#) {
        Ok(ask) => ask,
        Err(refused) => return *refused,
    };
    let worker = Arc::clone(&state);
    let done = tokio::task::spawn_blocking(move || {
        let now = worker.clock.now_ms();
        issue_account_token(
            worker.store.as_ref(),
            &worker.issuer,
            &account,
            ask.valid_days.unwrap_or(DEFAULT_TOKEN_DAYS),
            now,
        )
        .map(|(token, expires_ms)| (account, token, expires_ms))
    })
    .await;
    match done {
        Ok(Ok((account, token, expires_ms))) => {
            log(
                json!({"level": "info", "msg": "account token issued", "account": account, "expires_ms": expires_ms}),
            );
            (
                StatusCode::CREATED,
                Json(json!({"account": account, "token": token, "expires_ms": expires_ms, "scope": ACCOUNT_SCOPE})),
            )
                .into_response()
        }
        Ok(Err(e)) => refusal(StatusCode::CONFLICT, "conflict", format!("{e:#}")),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountUsageQuery {
    license: Option<String>,
    feature: Option<String>,
    meter: Option<String>,
    outcome: Option<String>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    granularity: Option<Granularity>,
}

async fn account_usage(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    query: Result<Query<AccountUsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "parameters: license, feature, meter, outcome, from_ms, to_ms, granularity=hour|day|month",
        );
    };
    for_account(state, headers, account, move |s, account, _| {
        let rows = s.store.usage(&UsageQuery {
            account: Some(account.to_string()),
            license: q.license,
            feature: q.feature,
            meter: q.meter,
            outcome: q.outcome,
            from_ms: q.from_ms,
            to_ms: q.to_ms,
            granularity: q.granularity,
        })?;
        Ok(Json(json!({"rows": rows})).into_response())
    })
    .await
}

/// Cost so far in the running billing period, its forecast, the account's budget and spend.
async fn account_cost(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    for_account(state, headers, account, move |s, account, now| {
        let catalog = s.control.catalog.current();
        let draft = crate::billing::draft(s.store.as_ref(), &catalog, account, now, now)?;
        let status = crate::control::account_status(s.store.as_ref(), &s.control, account, now)?;
        Ok(Json(json!({
            "account": account,
            "invoice": draft,
            "forecast_method": "each license's usage of each meter so far, extrapolated linearly to the end of the billing period, rated like the invoice",
            "standing": status,
        }))
        .into_response())
    })
    .await
}

async fn account_quotas(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    for_account(state, headers, account, move |s, account, now| {
        Ok(Json(json!({"quotas": s.store.quotas(account, now)?})).into_response())
    })
    .await
}

async fn account_users(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    for_account(state, headers, account, move |s, account, now| {
        let report = crate::control::users_report(s.store.as_ref(), &s.control, account, now)?;
        Ok(Json(report).into_response())
    })
    .await
}

/// The account's licenses: plan, features, limits with their headroom, and standing.
async fn account_licenses(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    for_account(state, headers, account, move |s, account, now| {
        let licenses = crate::overview::licenses(s.store.as_ref(), &s.control, account, now)?;
        Ok(Json(json!({"account": account, "licenses": licenses})).into_response())
    })
    .await
}

/// The refusal codes and their words, from the filter's list (public: no account data).
async fn refusal_codes() -> Response {
    Json(json!({"codes": crate::overview::refusal_codes()})).into_response()
}

/// A page of this crate, under the dashboards' content security policy.
pub(crate) fn page(html: &'static str) -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            (
                "content-security-policy",
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            ("cache-control", "no-store"),
        ],
        html,
    )
        .into_response()
}

/// The dashboard: one page, no external resources (it works offline and under a strict
/// content security policy); it reads the token from the URL fragment, which never reaches
/// the server or its logs.
async fn dashboard() -> Response {
    page(include_str!("dashboard.html"))
}
