//! What filters call: usage ingest (signed batches, stored exactly once, through group commit)
//! and the sync (quota leases, seats, refusals); and usage queries over what was stored.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use super::account::Caller;
use super::error::{blocking, refusal};
use super::extract::Signed;
use crate::state::AppState;
use crate::storage::{Ingested, UsageQuery};
use std::time::Instant;
use tollgate_wire::sync::SyncRequest;
use tollgate_wire::{AckStatus, BatchAck, Refusal, UsageBatch, WireError, VERSION};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/usage", post(ingest).get(usage))
        .route("/v1/sync", post(sync))
}

async fn ingest(State(state): State<Arc<AppState>>, Signed(body): Signed) -> Response {
    let started = Instant::now();
    let batch = match UsageBatch::decode(&body) {
        Ok(batch) => batch,
        Err(e @ WireError::TooLarge { .. }) => {
            state.metrics.rejected_too_large.inc();
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::BATCH_TOO_LARGE,
                e.to_string(),
            );
        }
        Err(e) => {
            state.metrics.rejected_malformed.inc();
            return refusal(
                StatusCode::BAD_REQUEST,
                Refusal::MALFORMED_BATCH,
                e.to_string(),
            );
        }
    };
    let batch = Arc::new(batch);
    let received_ms = state.clock.now_ms();
    let stored = state
        .group_commit
        .ingest(&state.store, Arc::clone(&batch), received_ms)
        .await;
    let outcome = match stored {
        Ok(outcome) => outcome,
        Err(e) => {
            state.metrics.store_errors.inc();
            tracing::error!(batch_id = %batch.batch_id, error = %format!("{e:#}"), "storing a batch failed");
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "{}: the batch was not stored; retry",
                    crate::storage::failure_reason(&e)
                ),
            );
        }
    };
    let (status, records) = match outcome {
        Ingested::Accepted { records } => {
            state.metrics.batches_accepted.inc();
            state.metrics.records_accepted.inc_by(records);
            (AckStatus::Accepted, records)
        }
        Ingested::Duplicate { records } => {
            state.metrics.batches_duplicate.inc();
            (AckStatus::Duplicate, records)
        }
    };
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let status_word = match status {
        AckStatus::Accepted => "accepted",
        AckStatus::Duplicate => "duplicate",
    };
    state
        .metrics
        .ingest_seconds
        .observe(started.elapsed().as_secs_f64());
    tracing::info!(batch_id = %batch.batch_id, status = status_word, records, micros, "batch");
    let ack = BatchAck {
        version: VERSION,
        batch_id: batch.batch_id.clone(),
        status,
        records,
    };
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        ack.encode(),
    )
        .into_response()
}

/// A filter's sync: quota leases and refusals. Its own `spawn_blocking`, not [`blocking`]: a
/// failure is counted and answered with the reason a filter logs.
async fn sync(State(state): State<Arc<AppState>>, Signed(body): Signed) -> Response {
    let request = match SyncRequest::decode(&body) {
        Ok(request) => request,
        Err(e) => {
            state.metrics.rejected_malformed.inc();
            return refusal(StatusCode::BAD_REQUEST, "malformed_sync", e.to_string());
        }
    };
    let worker = Arc::clone(&state);
    let answered = tokio::task::spawn_blocking(move || {
        let now = worker.clock.now_ms();
        crate::control::sync(worker.store.as_ref(), &worker.control, &request, now)
    })
    .await;
    match answered {
        Ok(Ok(response)) => {
            let m = &state.metrics;
            m.syncs.inc();
            for g in &response.grants {
                m.lease_units_granted.inc_by(g.granted);
                if g.granted == 0 {
                    m.leases_exhausted.inc();
                }
            }
            m.denials.inc_by(response.denials.len() as u64);
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                response.encode(),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            state.metrics.store_errors.inc();
            tracing::error!(error = %format!("{e:#}"), "sync failed");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "{}: the sync was not answered; retry",
                    crate::storage::failure_reason(&e)
                ),
            )
        }
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// Usage rows: for the admin token, or an account token asking for its own account.
async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("{}; parameters: account, license, feature, meter, outcome, from_ms, to_ms, granularity=hour|day|month", e.body_text()),
            )
        }
    };
    blocking(&state, move |s, _| {
        Ok(match super::account::caller(s, &headers) {
            Some(Caller::Admin) => Json(json!({"rows": s.store.usage(&query)?})).into_response(),
            Some(Caller::Account(a)) if query.account.as_deref() == Some(&a) => {
                Json(json!({"rows": s.store.usage(&query)?})).into_response()
            }
            _ => refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "usage queries need `authorization: Bearer <admin token>`, or an account token and `account=` its account",
            ),
        })
    })
    .await
}
