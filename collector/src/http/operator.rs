//! What operators change while filters run: revocation of a license, suspension of an account,
//! spend caps (budgets), and an account's standing. All need the admin token; a name nothing
//! here knows is refused (404) unless `?force=true`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::error::{blocking, refusal};
use super::extract::Admin;
use crate::state::AppState;
use crate::storage::{Budget, Store};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/admin/licenses/{license}/revoke",
            post(revoke).delete(unrevoke),
        )
        .route(
            "/v1/admin/accounts/{account}/suspend",
            post(suspend).delete(resume),
        )
        .route(
            "/v1/admin/accounts/{account}/budget",
            put(set_budget).delete(remove_budget),
        )
        .route("/v1/admin/accounts/{account}", get(account))
}

/// Optional `{"reason": "..."}`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Reason {
    reason: Option<String>,
}

fn reason_of(body: &[u8], default: &str) -> Result<String, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(default.to_string());
    }
    serde_json::from_slice::<Reason>(body)
        .map(|r| r.reason.unwrap_or_else(|| default.to_string()))
        .map_err(|e| format!("expected {{\"reason\": \"...\"}}: {e}"))
}

/// What an operator can refuse: a license (revocation) or an account (suspension).
#[derive(Clone, Copy)]
enum Restriction {
    License,
    Account,
}

/// `?force=true`: act on a license or account nothing here knows of (issued elsewhere).
#[derive(Debug, Default, serde::Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

/// The target of an admin change, which must be known unless forced.
fn require_known(
    store: &dyn Store,
    name: crate::storage::Named<'_>,
    force: &Force,
) -> anyhow::Result<()> {
    crate::storage::require_known(store, name, force.force, Some("?force=true"))
}

impl Restriction {
    fn named(self, id: &str) -> crate::storage::Named<'_> {
        match self {
            Restriction::License => crate::storage::Named::License(id),
            Restriction::Account => crate::storage::Named::Account(id),
        }
    }

    /// Log message and default reason when imposed; log message when lifted.
    fn words(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Restriction::License => (
                "license revoked",
                "revoked by an operator",
                "license revocation lifted",
            ),
            Restriction::Account => (
                "account suspended",
                "suspended by an operator",
                "account resumed",
            ),
        }
    }

    fn apply(
        self,
        store: &dyn Store,
        id: &str,
        reason: Option<&str>,
        now: u64,
    ) -> anyhow::Result<()> {
        match self {
            Restriction::License => store.set_revoked(id, reason, now),
            Restriction::Account => store.set_suspended(id, reason, now),
        }
    }
}

/// Impose (`body` given: an optional reason) or lift (`None`) a restriction; 204.
async fn restrict(
    state: Arc<AppState>,
    kind: Restriction,
    id: String,
    force: Force,
    body: Option<&[u8]>,
) -> Response {
    let (imposed, default_reason, lifted) = kind.words();
    let reason = match body.map(|b| reason_of(b, default_reason)).transpose() {
        Ok(reason) => reason,
        Err(problem) => return refusal(StatusCode::BAD_REQUEST, "bad_request", problem),
    };
    let msg = if reason.is_some() { imposed } else { lifted };
    changed(&state, move |store, now| {
        require_known(store, kind.named(&id), &force)?;
        match (kind, &reason) {
            (Restriction::License, Some(reason)) => tracing::info!(license = %id, %reason, "{msg}"),
            (Restriction::License, None) => tracing::info!(license = %id, "{msg}"),
            (Restriction::Account, Some(reason)) => tracing::info!(account = %id, %reason, "{msg}"),
            (Restriction::Account, None) => tracing::info!(account = %id, "{msg}"),
        }
        kind.apply(store, &id, reason.as_deref(), now)
    })
    .await
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(license): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
    body: Bytes,
) -> Response {
    restrict(state, Restriction::License, license, force, Some(&body)).await
}

async fn unrevoke(
    State(state): State<Arc<AppState>>,
    Path(license): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
) -> Response {
    restrict(state, Restriction::License, license, force, None).await
}

async fn suspend(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
    body: Bytes,
) -> Response {
    restrict(state, Restriction::Account, account, force, Some(&body)).await
}

async fn resume(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
) -> Response {
    restrict(state, Restriction::Account, account, force, None).await
}

async fn set_budget(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
    body: Bytes,
) -> Response {
    let budget: Budget = match serde_json::from_slice(&body) {
        Ok(budget) => budget,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "expected {{\"period\": \"hour|day|month\", \"amount\": \"<decimal>\"}}: {e}"
                ),
            )
        }
    };
    if budget.amount.is_sign_negative() {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a budget cannot be negative",
        );
    }
    changed(&state, move |store, now| {
        require_known(store, crate::storage::Named::Account(&account), &force)?;
        tracing::info!(account = %account, amount = %budget.amount.to_string(), period = %budget.period.as_str(), "budget set");
        store.set_budget(&account, Some(&budget), now)
    })
    .await
}

async fn remove_budget(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    _: Admin,
) -> Response {
    changed(&state, move |store, now| {
        require_known(store, crate::storage::Named::Account(&account), &force)?;
        tracing::info!(account = %account, "budget removed");
        store.set_budget(&account, None, now)
    })
    .await
}

async fn account(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, now| {
        let status = crate::control::account_status(s.store.as_ref(), &s.control, &account, now)?;
        Ok(Json(status).into_response())
    })
    .await
}

/// Run an admin change on the store: 204, or the error's answer.
async fn changed(
    state: &Arc<AppState>,
    change: impl FnOnce(&dyn Store, u64) -> anyhow::Result<()> + Send + 'static,
) -> Response {
    blocking(state, move |s, now| {
        change(s.store.as_ref(), now)?;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}
