//! The collector's HTTP API. This module is the router; each file below holds one area's
//! handlers, which parse the request, call a domain module off the async threads
//! ([`error::blocking`]) and shape the answer:
//!
//! - [`ingest`]: what filters call (usage batches, the sync) and usage queries;
//! - [`operator`]: revocations, suspensions, budgets, an account's standing;
//! - [`licenses`]: signing keys, the JWKS, licenses;
//! - [`billing`]: invoices, exports, the webhook log, the operator's overview;
//! - [`privacy`]: export and erasure of an account or an end user;
//! - [`account`]: the customer's read-only view of an account, and its tokens;
//! - [`health`]: liveness, readiness, metrics.
//!
//! [`extract`] has what several handlers take (the admin token, a signed body); [`error`] maps a
//! domain error to its HTTP answer once for all.

mod account;
mod billing;
mod error;
mod extract;
mod health;
mod ingest;
mod licenses;
mod operator;
mod privacy;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tollgate_wire::MAX_BATCH_BYTES;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::state::AppState;

/// The collector's routes. Every request runs in a span (method, path) that its log lines carry.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(ingest::routes())
        .merge(operator::routes())
        .merge(licenses::routes())
        .merge(billing::routes())
        .merge(privacy::routes())
        .merge(account::routes())
        .merge(health::routes())
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
        .with_state(state)
}
