//! Personal data's API (GDPR): export and erasure of an account, or of an end user's pseudonym.
//! The rules (what is kept, what a live license forbids) are in [`crate::privacy`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::error::blocking;
use super::extract::Admin;
use crate::state::AppState;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/v1/admin/accounts/{account}/data",
            get(export_account).delete(erase_account),
        )
        .route(
            "/v1/admin/subjects/{subject}/data",
            get(export_subject).delete(erase_subject),
        )
}

/// `GET /v1/admin/accounts/{account}/data`: everything stored about the account (GDPR access
/// and portability), by table.
async fn export_account(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, now| {
        let tables = s.store.export_account(&account)?;
        Ok(Json(json!({"account": account, "exported_ms": now, "tables": tables})).into_response())
    })
    .await
}

/// `DELETE /v1/admin/accounts/{account}/data`: erase it (409 while a license is valid).
async fn erase_account(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, now| {
        let erased = crate::privacy::erase_account(s.store.as_ref(), &account, now)?;
        s.control.licenses_recorded.forget();
        tracing::info!(account = %account, erased = %serde_json::json!(erased), "account erased");
        Ok(Json(json!({"account": account, "erased": erased})).into_response())
    })
    .await
}

/// `GET /v1/admin/subjects/{subject}/data`: the rows holding an end user's pseudonym.
async fn export_subject(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, now| {
        let tables = crate::privacy::export_subject(s.store.as_ref(), &subject)?;
        Ok(Json(json!({"subject": subject, "exported_ms": now, "tables": tables})).into_response())
    })
    .await
}

/// `DELETE /v1/admin/subjects/{subject}/data`: unlink the pseudonym from usage, delete its seats
/// and client entries.
async fn erase_subject(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, _| {
        let erased = crate::privacy::erase_subject(s.store.as_ref(), &subject)?;
        tracing::info!(subject = %subject, erased = %serde_json::json!(erased), "end user erased");
        Ok(Json(json!({"subject": subject, "erased": erased})).into_response())
    })
    .await
}
