//! Liveness, readiness and metrics, all answered from memory: none of them waits for the store
//! (readiness is what [`crate::health::Prober`] last saw).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;
use crate::telemetry::metrics::{Elsewhere, CONTENT_TYPE};

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

/// From memory: never waits for the store (see [`crate::health`]).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let answer = state.readiness.answer(Instant::now());
    let status = if answer.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [("content-type", "application/json")], answer.body).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let groups = state.group_commit.stats();
    let elsewhere = Elsewhere {
        ingest_commits: groups.commits.load(Ordering::Relaxed),
        ingest_committed_batches: groups.batches.load(Ordering::Relaxed),
        sharing_alerts: state.control.sharing_alerts.load(Ordering::Relaxed),
    };
    (
        [("content-type", CONTENT_TYPE)],
        state.metrics.render(elsewhere),
    )
        .into_response()
}
