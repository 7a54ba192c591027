//! The license server's and billing's HTTP API: signing keys and the JWKS, licenses, invoice
//! drafts and usage exports. Everything but the JWKS needs the admin token.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::exports::{self, Format};
use crate::licensing::{self, Invalid, LicenseRequest};
use crate::server::{admin_refusal, log, refusal};
use crate::signing::KeyAlg;
use crate::AppState;

/// The routes of this module, merged into [`crate::app`].
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/.well-known/jwks.json", get(jwks))
        .route("/v1/admin/keys", get(list_keys).post(add_key))
        .route("/v1/admin/keys/{kid}/retire", post(retire_key))
        .route("/v1/admin/licenses", get(list_licenses).post(issue_license))
        .route("/v1/admin/licenses/{license}", get(show_license))
        .route("/v1/admin/accounts/{account}/invoice", get(invoice))
        .route(
            "/v1/admin/accounts/{account}/invoices",
            get(list_invoices).post(finalize_invoice),
        )
        .route("/v1/admin/webhooks/events", get(webhook_events))
        .route("/v1/admin/overview", get(overview))
        .route("/admin/dashboard", get(operator_dashboard))
        .route("/v1/admin/exports/usage", get(export_usage))
        .route(
            "/v1/admin/accounts/{account}/data",
            get(export_account).delete(erase_account),
        )
        .route(
            "/v1/admin/subjects/{subject}/data",
            get(export_subject).delete(erase_subject),
        )
}

/// Run `work` off the async threads and answer with what it returns; an [`Invalid`] error is
/// the caller's (400 or 409), any other the store's (503).
async fn blocking(
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
        Ok(Err(e)) if e.downcast_ref::<crate::billing::FinalizeFirst>().is_some() => {
            refusal(StatusCode::CONFLICT, "conflict", format!("{e:#}"))
        }
        Ok(Err(e)) => match e.downcast_ref::<Invalid>() {
            Some(invalid) if invalid.conflict => {
                refusal(StatusCode::CONFLICT, "conflict", invalid.message.clone())
            }
            Some(invalid) => refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                invalid.message.clone(),
            ),
            None => {
                log(
                    json!({"level": "error", "msg": "admin request failed", "error": format!("{e:#}")}),
                );
                refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!("{e:#}"),
                )
            }
        },
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
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

/// Every account: revenue so far and forecast, top consumers, refusals, licenses near a limit.
async fn overview(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    blocking(&state, |s, now| {
        let overview = crate::overview::overview(s.store.as_ref(), &s.control, now)?;
        Ok(Json(overview).into_response())
    })
    .await
}

/// The operator's dashboard: the page holds no data; it reads `/v1/admin/overview` with the
/// admin token from the URL fragment.
async fn operator_dashboard() -> Response {
    crate::customer::page(include_str!("operator.html"))
}

async fn list_keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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

/// An optional JSON body (empty: the defaults), or the 400 to answer.
pub(crate) fn json_body<T: serde::de::DeserializeOwned + Default>(
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

async fn add_key(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
        log(json!({"level": "info", "msg": "signing key added", "kid": key.kid, "alg": key.alg, "activates_ms": key.activates_ms}));
        Ok((StatusCode::CREATED, Json(key)).into_response())
    })
    .await
}

async fn retire_key(
    State(state): State<Arc<AppState>>,
    Path(kid): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    blocking(&state, move |s, now| {
        if !s.store.retire_signing_key(&kid, now)? {
            return Ok(refusal(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no key `{kid}`"),
            ));
        }
        log(json!({"level": "info", "msg": "signing key retired", "kid": kid}));
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
    headers: HeaderMap,
    filter: Result<Query<LicenseFilter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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

async fn issue_license(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
        log(json!({"level": "info", "msg": "license issued", "license": issued.license.license, "account": issued.license.account, "plan": issued.license.plan, "kid": issued.license.kid}));
        Ok((StatusCode::CREATED, Json(issued)).into_response())
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    /// A time in the billing period (Unix ms); default now.
    at_ms: Option<u64>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

async fn invoice(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    query: Result<Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let Ok(Query(query)) = query else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "parameters: at_ms, format=json|csv",
        );
    };
    let csv = match query.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("format `{other}`: json or csv"),
            )
        }
    };
    blocking(&state, move |s, now| {
        let catalog = s.control.catalog.current();
        let invoice = crate::billing::draft(
            s.store.as_ref(),
            &catalog,
            &account,
            query.at_ms.unwrap_or(now),
            now,
        )?;
        Ok(if csv {
            (
                [("content-type", "text/csv; charset=utf-8")],
                invoice.invoice.to_csv(),
            )
                .into_response()
        } else {
            Json(invoice).into_response()
        })
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    from_ms: u64,
    to_ms: u64,
    format: Format,
    /// Continue after this record (the `next_after_id` of the previous page).
    #[serde(default)]
    after_id: i64,
    /// Records per page (default and at most 10,000).
    #[serde(default)]
    limit: Option<u32>,
}

/// The largest page of an export.
const EXPORT_PAGE: u32 = 10_000;

async fn export_usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "bad_query",
                format!("{}; parameters: from_ms, to_ms, format=csv|json|stripe|cloudevents, after_id, limit", e.body_text()),
            )
        }
    };
    blocking(&state, move |s, now| {
        let limit = query.limit.unwrap_or(EXPORT_PAGE).clamp(1, EXPORT_PAGE);
        // Only batches stored a while ago: record ids are not handed out in commit order
        // (PostgreSQL sequences), so a batch still committing could land behind the cursor.
        let settled = now.saturating_sub(crate::billing::SETTLE_MS);
        let records =
            s.store
                .records(query.from_ms, query.to_ms, query.after_id, limit, settled)?;
        // The page is full: there may be more after its last record.
        let next = (records.len() == limit as usize)
            .then(|| records.last().map(|r| r.id))
            .flatten();
        let catalog = s.control.catalog.current();
        let body = match query.format {
            Format::Csv => {
                let mut text = String::from(exports::CSV_HEADER);
                text.push_str(&exports::csv_records(&records));
                text
            }
            Format::Json => {
                json!({"records": exports::json_records(&records), "next_after_id": next})
                    .to_string()
            }
            Format::Stripe => {
                json!({"events": exports::stripe_events(&catalog, &records), "next_after_id": next})
                    .to_string()
            }
            Format::Cloudevents => json!(exports::cloud_events(&catalog, &records)).to_string(),
        };
        let mut response = ([("content-type", query.format.content_type())], body).into_response();
        if let Some(next) = next {
            if let Ok(value) = next.to_string().parse() {
                response
                    .headers_mut()
                    .insert("tollgate-next-after-id", value);
            }
        }
        Ok(response)
    })
    .await
}

async fn list_invoices(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    blocking(&state, move |s, _| {
        Ok(Json(json!({"invoices": s.store.invoices(Some(&account))?})).into_response())
    })
    .await
}

/// `GET /v1/admin/accounts/{account}/data`: everything stored about the account (GDPR access
/// and portability), by table.
async fn export_account(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    blocking(&state, move |s, now| {
        let erased = crate::privacy::erase_account(s.store.as_ref(), &account, now)?;
        s.control.licenses_recorded.forget();
        log(
            json!({"level": "info", "msg": "account erased", "account": account, "erased": erased}),
        );
        Ok(Json(json!({"account": account, "erased": erased})).into_response())
    })
    .await
}

/// `GET /v1/admin/subjects/{subject}/data`: the rows holding an end user's pseudonym.
async fn export_subject(
    State(state): State<Arc<AppState>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    blocking(&state, move |s, _| {
        let erased = crate::privacy::erase_subject(s.store.as_ref(), &subject)?;
        log(json!({"level": "info", "msg": "end user erased", "subject": subject, "erased": erased}));
        Ok(Json(json!({"subject": subject, "erased": erased})).into_response())
    })
    .await
}

/// `POST /v1/admin/accounts/{account}/invoices`: finalise the invoice of the period containing
/// `at_ms` (default: the last period that ended), after the earlier periods with usage and no
/// invoice.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Finalize {
    #[serde(default)]
    at_ms: Option<u64>,
}

async fn finalize_invoice(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let ask: Finalize = match json_body(&body, r#"{"at_ms": <a time in the period, Unix ms>}"#) {
        Ok(ask) => ask,
        Err(refused) => return *refused,
    };
    blocking(&state, move |s, now| {
        let catalog = s.control.catalog.current();
        let at = ask.at_ms.unwrap_or_else(|| {
            catalog
                .period_bounds(catalog.billing_period, now)
                .0
                .saturating_sub(1)
        });
        // Earlier periods with usage and no invoice are finalised first, in order.
        let finalized =
            crate::billing::finalize_in_order(s.store.as_ref(), &catalog, &account, at, now)?;
        for (invoice, new) in &finalized {
            if *new {
                log(json!({"level": "info", "msg": "invoice finalised", "invoice_id": invoice.invoice_id, "total": invoice.total, "currency": invoice.currency}));
            }
        }
        let Some((invoice, new)) = finalized.into_iter().last() else {
            anyhow::bail!("nothing was finalised");
        };
        let status = if new { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(invoice)).into_response())
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<u32>,
}

/// The latest webhook events, each with its delivery log.
async fn webhook_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let Ok(Query(query)) = query else {
        return refusal(StatusCode::BAD_REQUEST, "bad_query", "parameters: limit");
    };
    blocking(&state, move |s, _| {
        let mut out = Vec::new();
        for event in s
            .store
            .webhook_events(query.limit.unwrap_or(100).min(1000))?
        {
            let deliveries = s.store.deliveries(&event.event_id)?;
            let mut v = json!(event);
            v["deliveries"] = json!(deliveries);
            out.push(v);
        }
        Ok(Json(json!({"events": out})).into_response())
    })
    .await
}
