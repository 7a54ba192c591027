//! Billing's API: invoice drafts and finalised invoices, usage exports, the webhook log, and the
//! operator's overview and dashboard. All need the admin token (the dashboard page holds no
//! data: it reads the overview with the token from its URL fragment).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::{blocking, json_body, refusal};
use super::extract::Admin;
use crate::exports::{self, Format};
use crate::state::AppState;

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/admin/accounts/{account}/invoice", get(invoice))
        .route(
            "/v1/admin/accounts/{account}/invoices",
            get(list_invoices).post(finalize_invoice),
        )
        .route("/v1/admin/webhooks/events", get(webhook_events))
        .route("/v1/admin/overview", get(overview))
        .route("/admin/dashboard", get(operator_dashboard))
        .route("/v1/admin/exports/usage", get(export_usage))
}

/// Every account: revenue so far and forecast, top consumers, refusals, licenses near a limit.
async fn overview(State(state): State<Arc<AppState>>, _: Admin) -> Response {
    blocking(&state, |s, now| {
        let overview = crate::overview::overview(s.store.as_ref(), &s.control, now)?;
        Ok(Json(overview).into_response())
    })
    .await
}

/// The operator's dashboard: the page holds no data; it reads `/v1/admin/overview` with the
/// admin token from the URL fragment.
async fn operator_dashboard() -> Response {
    super::account::page(include_str!("operator.html"))
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
    _: Admin,
    query: Result<Query<InvoiceQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
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

async fn list_invoices(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    _: Admin,
) -> Response {
    blocking(&state, move |s, _| {
        Ok(Json(json!({"invoices": s.store.invoices(Some(&account))?})).into_response())
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
    _: Admin,
    body: Bytes,
) -> Response {
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
                tracing::info!(invoice_id = %invoice.invoice_id, total = %invoice.total, currency = %invoice.currency, "invoice finalised");
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
    _: Admin,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<u32>,
}

/// The latest webhook events, each with its delivery log.
async fn webhook_events(
    State(state): State<Arc<AppState>>,
    _: Admin,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
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
