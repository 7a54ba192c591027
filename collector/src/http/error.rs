//! How a handler's failure becomes an HTTP answer, in one place: a refusal is the same JSON
//! body everywhere (`tollgate_wire::Refusal`: a code and a message), and a domain error maps to
//! its status by type: [`Invalid`] 400 (or 409), [`FinalizeFirst`] 409, [`UnknownName`] 404,
//! anything else is the store's (503, logged).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tollgate_wire::Refusal;

use crate::billing::FinalizeFirst;
use crate::errors::Invalid;
use crate::state::AppState;
use crate::storage::UnknownName;

/// A refusal: `status` with `{"error": code, "message": ...}`.
pub(crate) fn refusal(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "application/json")],
        Refusal::new(code, message).encode(),
    )
        .into_response()
}

/// The answer to a request whose work failed with `e`.
pub(super) fn answer(e: &anyhow::Error) -> Response {
    if let Some(invalid) = e.downcast_ref::<Invalid>() {
        let (status, code) = if invalid.conflict {
            (StatusCode::CONFLICT, "conflict")
        } else {
            (StatusCode::BAD_REQUEST, "bad_request")
        };
        return refusal(status, code, invalid.message.clone());
    }
    if e.downcast_ref::<FinalizeFirst>().is_some() {
        return refusal(StatusCode::CONFLICT, "conflict", format!("{e:#}"));
    }
    if let Some(unknown) = e.downcast_ref::<UnknownName>() {
        return refusal(
            StatusCode::NOT_FOUND,
            &format!("unknown_{}", unknown.kind),
            format!("{e:#}"),
        );
    }
    tracing::error!(error = %format!("{e:#}"), "request failed");
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("{e:#}"),
    )
}

/// Run `work` (which reads the store: blocking) off the async threads at the clock's now, and
/// answer with what it returns or with its error's answer.
pub(super) async fn blocking(
    state: &Arc<AppState>,
    work: impl FnOnce(&AppState, u64) -> anyhow::Result<Response> + Send + 'static,
) -> Response {
    let worker = Arc::clone(state);
    match tokio::task::spawn_blocking(move || {
        let now = worker.clock.now_ms();
        work(&worker, now)
    })
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => answer(&e),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// An optional JSON body (empty: the defaults), or the 400 to answer.
pub(super) fn json_body<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    shape: &str,
) -> Result<T, Box<Response>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new(refusal(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("expected {shape}: {e}"),
        ))
    })
}
