//! What customers see: a read-only view of one account (usage, cost so far and the forecast,
//! quotas, users, licenses), for the admin token or a bearer token scoped to that account
//! ([`crate::account_tokens`]), the dashboard page that draws it, and issuing those tokens.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::{blocking, json_body, refusal};
use super::extract::Admin;
use crate::account_tokens::{
    issue_account_token, verify_account_token, ACCOUNT_SCOPE, DEFAULT_TOKEN_DAYS,
};
use crate::state::AppState;
use crate::storage::{Granularity, UsageQuery};

pub(super) fn routes() -> Router<Arc<AppState>> {
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

/// Who calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Caller {
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
pub(super) fn caller(state: &AppState, headers: &HeaderMap) -> Option<Caller> {
    if super::extract::admin_refusal(state, headers).is_none() {
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

/// Run `work` for a caller allowed to read `account`: the admin, or the account's own token
/// (checked off the async threads too: it reads the signing keys).
async fn for_account(
    state: Arc<AppState>,
    headers: HeaderMap,
    account: String,
    work: impl FnOnce(&AppState, &str, u64) -> anyhow::Result<Response> + Send + 'static,
) -> Response {
    blocking(&state, move |s, now| match caller(s, &headers) {
        Some(Caller::Admin) => work(s, &account, now),
        Some(Caller::Account(a)) if a == account => work(s, &account, now),
        _ => Ok(unauthorized()),
    })
    .await
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
    _: Admin,
    body: Bytes,
) -> Response {
    let ask: NewToken = match json_body(&body, r#"{"valid_days": 1-366}"#) {
        Ok(ask) => ask,
        Err(refused) => return *refused,
    };
    blocking(&state, move |s, now| {
        let issued = issue_account_token(
            s.store.as_ref(),
            &s.issuer,
            &account,
            ask.valid_days.unwrap_or(DEFAULT_TOKEN_DAYS),
            now,
        );
        Ok(match issued {
            Ok((token, expires_ms)) => {
                tracing::info!(account = %account, expires_ms, "account token issued");
                (
                    StatusCode::CREATED,
                    Json(json!({"account": account, "token": token, "expires_ms": expires_ms, "scope": ACCOUNT_SCOPE})),
                )
                    .into_response()
            }
            Err(e) => refusal(StatusCode::CONFLICT, "conflict", format!("{e:#}")),
        })
    })
    .await
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
pub(super) fn page(html: &'static str) -> Response {
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
