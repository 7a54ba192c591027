//! What several handlers take from a request before they run: the admin token ([`Admin`]) and a
//! body signed with an ingest key ([`Signed`]). Each refuses the request with its answer, so a
//! handler that takes one cannot forget the check.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tollgate_wire::{KEY_ID_HEADER, SIGNATURE_HEADER};

use super::error::refusal;
use crate::state::AppState;

/// The request carries `authorization: Bearer <admin token>`.
pub(super) struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Admin, Response> {
        admin_refusal(state, &parts.headers).map_or(Ok(Admin), Err)
    }
}

/// `None` if `headers` carry the admin token, else the refusal to send.
pub(super) fn admin_refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &state.admin_token else {
        return Some(refusal(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "the admin API is off: start the collector with --admin-token",
        ));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        None
    } else {
        Some(refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs `authorization: Bearer <admin token>`",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A body with a valid signature under a known ingest key (`tollgate-key-id`,
/// `tollgate-signature: sha256=<HMAC of the body>`); a request without one is counted
/// (`rejected_total{reason="unauthorized"}`) and refused with 401.
pub(super) struct Signed(pub Bytes);

impl FromRequest<Arc<AppState>> for Signed {
    type Rejection = Response;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Signed, Response> {
        let headers = req.headers().clone();
        let body = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let signed = header(KEY_ID_HEADER)
            .and_then(|id| state.keys.secret(id))
            .zip(header(SIGNATURE_HEADER))
            .is_some_and(|(secret, signature)| tollgate_wire::verify(secret, &body, signature));
        if !signed {
            state.metrics.rejected_unauthorized.inc();
            return Err(refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("a request must be signed: {KEY_ID_HEADER} names a known key and {SIGNATURE_HEADER} is sha256=<HMAC of the body>"),
            ));
        }
        Ok(Signed(body))
    }
}
