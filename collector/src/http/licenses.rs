//! The license server's API: signing keys and the JWKS filters fetch, and licenses. Everything
//! but the JWKS needs the admin token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::{blocking, json_body, refusal};
use super::extract::Admin;
use crate::licensing::{self, LicenseRequest};
use crate::signing::KeyAlg;
use crate::state::AppState;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/admin/keys", get(list_keys).post(add_key))
        .route("/v1/admin/keys/{kid}/retire", post(retire_key))
        .route("/v1/admin/licenses", get(list_licenses).post(issue_license))
        .route("/v1/admin/licenses/{license}", get(show_license))
}

/// The public keys of licenses: what filters fetch (`token.jwks_cluster`).
async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    blocking(&state, |s, _| {
        let jwks = licensing::jwks(s.store.as_ref())?;
        Ok((
            [
                ("content-type", "application/jwk-set+json"),
                ("cache-control", "max-age=60"),
            ],
            jwks.to_string(),
        )
            .into_response())
    })
    .await
}

async fn list_keys(State(state): State<Arc<AppState>>, _: Admin) -> Response {
    blocking(&state, |s, now| {
        Ok(Json(json!({"keys": licensing::keys(s.store.as_ref(), now)?})).into_response())
    })
    .await
}

/// `POST /v1/admin/keys`: generate (no `private_pem`) or import a key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKey {
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    private_pem: Option<String>,
    /// Publish now, sign from this many seconds on (default 0).
    #[serde(default)]
    activate_in_seconds: u64,
}

async fn add_key(State(state): State<Arc<AppState>>, _: Admin, body: Bytes) -> Response {
    let ask: AddKey = match json_body(
        &body,
        r#"{"alg": "EdDSA|ES256|RS256", "kid": "...", "private_pem": "<PKCS#8 PEM, to import>", "activate_in_seconds": 0}"#,
    ) {
        Ok(ask) => ask,
        Err(refused) => return *refused,
    };
    let alg: KeyAlg = match ask.alg.as_deref().unwrap_or("EdDSA").parse() {
        Ok(alg) => alg,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, "bad_request", format!("alg: {e}")),
    };
    blocking(&state, move |s, now| {
        let key = licensing::add_key(
            s.store.as_ref(),
            alg,
            ask.kid.as_deref(),
            ask.private_pem.as_deref(),
            ask.activate_in_seconds.saturating_mul(1000),
            now,
        )?;
        tracing::info!(kid = %key.kid, alg = %key.alg, activates_ms = key.activates_ms, "signing key added");
        Ok((StatusCode::CREATED, Json(key)).into_response())
    })
    .await
}

async fn retire_key(
    State(state): State<Arc<AppState>>,
    Path(kid): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, now| {
        if !s.store.retire_signing_key(&kid, now)? {
            return Ok(refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no key `{kid}`"),
            ));
        }
        tracing::info!(kid = %kid, "signing key retired");
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LicenseFilter {
    account: Option<String>,
}

/// A license with its standing: revoked or not, the last time a filter named it.
async fn list_licenses(
    State(state): State<Arc<AppState>>,
    _: Admin,
    filter: Result<Query<LicenseFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(filter)) = filter else {
        return refusal(StatusCode::BAD_REQUEST, "bad_query", "parameters: account");
    };
    blocking(&state, move |s, _| {
        let licenses =
            crate::licensing::shown_licenses(s.store.as_ref(), filter.account.as_deref())?;
        Ok(Json(json!({"licenses": licenses})).into_response())
    })
    .await
}

async fn show_license(
    State(state): State<Arc<AppState>>,
    Path(license): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, _| {
        match crate::licensing::shown_license(s.store.as_ref(), &license)? {
            Some(l) => Ok(Json(l).into_response()),
            None => Ok(refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no license `{license}` was issued here"),
            )),
        }
    })
    .await
}

async fn issue_license(State(state): State<Arc<AppState>>, _: Admin, body: Bytes) -> Response {
    let request: LicenseRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"account\", \"plan\", \"features\": [...], \"limits\"?, \"license_id\"?, \"not_before\"?, \"expires_at\"? | \"valid_days\"?}}: {e}"),
            )
        }
    };
    blocking(&state, move |s, now| {
        let plans = s.control.catalog.current().plan_names();
        let issued = licensing::issue(s.store.as_ref(), &s.issuer, &plans, &request, now)?;
        tracing::info!(license = %issued.license.license, account = %issued.license.account, plan = %issued.license.plan, kid = %issued.license.kid, "license issued");
        Ok((StatusCode::CREATED, Json(issued)).into_response())
    })
    .await
}
