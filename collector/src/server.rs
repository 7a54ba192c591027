//! The collector's HTTP API: usage ingest (signed batches, exactly once), usage queries, the
//! filters' sync (quota leases, refusals), the admin API (revocation, suspension, budgets),
//! health and Prometheus metrics. Keys, licenses, invoices and exports are in [`crate::admin`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use tollgate_wire::{
    AckStatus, BatchAck, Refusal, UsageBatch, WireError, KEY_ID_HEADER, MAX_BATCH_BYTES,
    SIGNATURE_HEADER, VERSION,
};

use tollgate_wire::sync::SyncRequest;

use crate::control::ControlPlane;
use crate::store::{now_ms, Budget, Ingested, Store, UsageQuery};

/// Shared secrets that may sign batches, by key id. Several at once allow rotation: add the
/// new key, move the filters to it, then remove the old one.
#[derive(Debug, Clone, Default)]
pub struct IngestKeys(HashMap<String, Vec<u8>>);

impl IngestKeys {
    /// Parse `id=secret` items.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> anyhow::Result<IngestKeys> {
        let mut keys = HashMap::new();
        for item in items {
            let Some((id, secret)) = item.split_once('=') else {
                anyhow::bail!(
                    "an ingest key is `id=secret`, got `{}`",
                    item.chars().take(20).collect::<String>()
                );
            };
            if id.is_empty() || secret.len() < 16 {
                anyhow::bail!("ingest key `{id}`: the id must not be empty and the secret needs at least 16 bytes");
            }
            keys.insert(id.to_string(), secret.as_bytes().to_vec());
        }
        Ok(IngestKeys(keys))
    }

    fn secret(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(Vec::as_slice)
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    batches_accepted: AtomicU64,
    batches_duplicate: AtomicU64,
    records_accepted: AtomicU64,
    rejected_unauthorized: AtomicU64,
    rejected_malformed: AtomicU64,
    rejected_too_large: AtomicU64,
    store_errors: AtomicU64,
    syncs: AtomicU64,
    lease_units_granted: AtomicU64,
    leases_exhausted: AtomicU64,
    denials: AtomicU64,
    /// Rounds of the background worker (webhooks, budgets, invoices, retention) completed.
    pub worker_rounds: AtomicU64,
    ingest_micros_sum: AtomicU64,
    ingest_count: AtomicU64,
    /// Cumulative counts of ingest latency at or under each bound of [`LATENCY_BOUNDS_US`].
    ingest_buckets: [AtomicU64; 8],
}

const LATENCY_BOUNDS_US: [u64; 8] = [250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];

impl Metrics {
    fn observe(&self, micros: u64) {
        self.ingest_micros_sum.fetch_add(micros, Ordering::Relaxed);
        self.ingest_count.fetch_add(1, Ordering::Relaxed);
        for (bound, bucket) in LATENCY_BOUNDS_US.iter().zip(&self.ingest_buckets) {
            if micros <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn render(&self, groups: &crate::group_commit::GroupStats) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, lines: Vec<(String, u64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for (labels, value) in lines {
                out.push_str(&format!("{name}{labels} {value}\n"));
            }
        };
        counter(
            "tollgate_collector_batches_total",
            "Usage batches taken, by result.",
            vec![
                ("{result=\"accepted\"}".into(), get(&self.batches_accepted)),
                (
                    "{result=\"duplicate\"}".into(),
                    get(&self.batches_duplicate),
                ),
            ],
        );
        counter(
            "tollgate_collector_worker_rounds_total",
            "Rounds of the background worker (webhooks, budgets, invoices, retention) completed.",
            vec![(String::new(), get(&self.worker_rounds))],
        );
        counter(
            "tollgate_collector_records_total",
            "Usage records stored.",
            vec![(String::new(), get(&self.records_accepted))],
        );
        counter(
            "tollgate_collector_rejected_total",
            "Requests to the ingest endpoint refused, by reason.",
            vec![
                (
                    "{reason=\"unauthorized\"}".into(),
                    get(&self.rejected_unauthorized),
                ),
                (
                    "{reason=\"malformed\"}".into(),
                    get(&self.rejected_malformed),
                ),
                (
                    "{reason=\"too_large\"}".into(),
                    get(&self.rejected_too_large),
                ),
                ("{reason=\"store_error\"}".into(), get(&self.store_errors)),
            ],
        );
        counter(
            "tollgate_collector_ingest_commits_total",
            "Transactions that stored usage batches (batches arriving together share one).",
            vec![(String::new(), get(&groups.commits))],
        );
        counter(
            "tollgate_collector_ingest_committed_batches_total",
            "Usage batches those transactions held (over commits: the batches per commit).",
            vec![(String::new(), get(&groups.batches))],
        );
        counter(
            "tollgate_collector_syncs_total",
            "Filter syncs answered.",
            vec![(String::new(), get(&self.syncs))],
        );
        counter(
            "tollgate_collector_lease_units_granted_total",
            "Quota units handed out in leases.",
            vec![(String::new(), get(&self.lease_units_granted))],
        );
        counter(
            "tollgate_collector_leases_exhausted_total",
            "Lease requests answered with nothing left (or for a refused license).",
            vec![(String::new(), get(&self.leases_exhausted))],
        );
        counter(
            "tollgate_collector_denials_total",
            "Licenses filters were told to refuse (revoked, suspended, spend cap).",
            vec![(String::new(), get(&self.denials))],
        );
        out.push_str(
            "# HELP tollgate_collector_ingest_seconds Time to verify, decode and store a batch.\n",
        );
        out.push_str("# TYPE tollgate_collector_ingest_seconds histogram\n");
        for (bound, bucket) in LATENCY_BOUNDS_US.iter().zip(&self.ingest_buckets) {
            out.push_str(&format!(
                "tollgate_collector_ingest_seconds_bucket{{le=\"{}\"}} {}\n",
                *bound as f64 / 1e6,
                get(bucket)
            ));
        }
        let count = get(&self.ingest_count);
        out.push_str(&format!(
            "tollgate_collector_ingest_seconds_bucket{{le=\"+Inf\"}} {count}\n"
        ));
        out.push_str(&format!(
            "tollgate_collector_ingest_seconds_sum {}\ntollgate_collector_ingest_seconds_count {count}\n",
            get(&self.ingest_micros_sum) as f64 / 1e6
        ));
        out
    }
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub keys: IngestKeys,
    pub metrics: Metrics,
    pub control: ControlPlane,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// The `iss` and `aud` of the licenses issued here.
    pub issuer: crate::licensing::Issuer,
    /// Where events go; `None`: no webhooks (and no spend-threshold events).
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    pub billing: crate::worker::BillingSettings,
    /// What `/readyz` answers, kept by [`crate::health::Prober`] while [`crate::serve`] runs.
    pub readiness: Arc<crate::health::Readiness>,
    /// The wall clock every decision reads.
    pub clock: Arc<crate::clock::Clock>,
    /// Batches arriving together are stored in one transaction.
    pub group_commit: crate::group_commit::GroupCommit,
}

impl AppState {
    /// A state with the default control plane (UTC, no prices) and no admin API.
    pub fn new(store: Arc<dyn Store>, keys: IngestKeys) -> AppState {
        AppState {
            store,
            keys,
            metrics: Metrics::default(),
            control: ControlPlane::default(),
            admin_token: None,
            issuer: crate::licensing::Issuer::default(),
            webhooks: None,
            billing: crate::worker::BillingSettings::default(),
            readiness: Arc::default(),
            clock: Arc::default(),
            group_commit: Default::default(),
        }
    }
}

/// The collector's routes.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/usage", post(ingest).get(usage))
        .route("/v1/sync", post(sync))
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
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(crate::admin::routes())
        .merge(crate::customer::routes())
        .layer(DefaultBodyLimit::max(MAX_BATCH_BYTES))
        .with_state(state)
}

pub(crate) fn refusal(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        [("content-type", "application/json")],
        Refusal::new(code, message).encode(),
    )
        .into_response()
}

/// Whether `info` lines are logged (errors always are). The demo and benchmarks turn them off.
static INFO_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the per-batch `info` log lines on or off.
pub fn set_info_logs(enabled: bool) {
    INFO_LOGS.store(enabled, Ordering::Relaxed);
}

pub(crate) fn log(fields: serde_json::Value) {
    if fields["level"] == "info" && !INFO_LOGS.load(Ordering::Relaxed) {
        return;
    }
    let mut line = json!({"ts_ms": now_ms()});
    if let (Some(line), Some(fields)) = (line.as_object_mut(), fields.as_object()) {
        line.extend(fields.clone());
    }
    eprintln!("{line}");
}

/// True when `body` carries a valid signature under a known ingest key.
fn signed(state: &AppState, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header(KEY_ID_HEADER)
        .and_then(|id| state.keys.secret(id))
        .zip(header(SIGNATURE_HEADER))
        .is_some_and(|(secret, signature)| tollgate_wire::verify(secret, body, signature))
}

fn unsigned() -> Response {
    refusal(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        format!("a request must be signed: {KEY_ID_HEADER} names a known key and {SIGNATURE_HEADER} is sha256=<HMAC of the body>"),
    )
}

async fn ingest(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if !signed(&state, &headers, &body) {
        state
            .metrics
            .rejected_unauthorized
            .fetch_add(1, Ordering::Relaxed);
        return unsigned();
    }
    let batch = match UsageBatch::decode(&body) {
        Ok(batch) => batch,
        Err(e @ WireError::TooLarge { .. }) => {
            state
                .metrics
                .rejected_too_large
                .fetch_add(1, Ordering::Relaxed);
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::BATCH_TOO_LARGE,
                e.to_string(),
            );
        }
        Err(e) => {
            state
                .metrics
                .rejected_malformed
                .fetch_add(1, Ordering::Relaxed);
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
            state.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            log(
                json!({"level": "error", "msg": "storing a batch failed", "batch_id": batch.batch_id, "error": format!("{e:#}")}),
            );
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "{}: the batch was not stored; retry",
                    crate::store::failure_reason(&e)
                ),
            );
        }
    };
    let (status, records) = match outcome {
        Ingested::Accepted { records } => {
            state
                .metrics
                .batches_accepted
                .fetch_add(1, Ordering::Relaxed);
            state
                .metrics
                .records_accepted
                .fetch_add(records, Ordering::Relaxed);
            (AckStatus::Accepted, records)
        }
        Ingested::Duplicate { records } => {
            state
                .metrics
                .batches_duplicate
                .fetch_add(1, Ordering::Relaxed);
            (AckStatus::Duplicate, records)
        }
    };
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    state.metrics.observe(micros);
    log(
        json!({"level": "info", "msg": "batch", "batch_id": batch.batch_id, "status": status, "records": records, "micros": micros}),
    );
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

/// A filter's sync: quota leases and refusals.
async fn sync(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !signed(&state, &headers, &body) {
        state
            .metrics
            .rejected_unauthorized
            .fetch_add(1, Ordering::Relaxed);
        return unsigned();
    }
    let request = match SyncRequest::decode(&body) {
        Ok(request) => request,
        Err(e) => {
            state
                .metrics
                .rejected_malformed
                .fetch_add(1, Ordering::Relaxed);
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
            m.syncs.fetch_add(1, Ordering::Relaxed);
            for g in &response.grants {
                m.lease_units_granted
                    .fetch_add(g.granted, Ordering::Relaxed);
                if g.granted == 0 {
                    m.leases_exhausted.fetch_add(1, Ordering::Relaxed);
                }
            }
            m.denials
                .fetch_add(response.denials.len() as u64, Ordering::Relaxed);
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                response.encode(),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            state.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            log(json!({"level": "error", "msg": "sync failed", "error": format!("{e:#}")}));
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "{}: the sync was not answered; retry",
                    crate::store::failure_reason(&e)
                ),
            )
        }
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// `None` if the request carries the admin token, else the refusal to send.
pub(crate) fn admin_refusal(state: &AppState, headers: &HeaderMap) -> Option<Response> {
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

/// Run an admin change on the store and answer 204, or the error.
async fn admin_change(
    state: Arc<AppState>,
    change: impl FnOnce(&dyn Store, u64) -> anyhow::Result<()> + Send + 'static,
) -> Response {
    let worker = Arc::clone(&state);
    let done =
        tokio::task::spawn_blocking(move || change(worker.store.as_ref(), worker.clock.now_ms()))
            .await;
    match done {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) if e.downcast_ref::<crate::store::UnknownName>().is_some() => {
            let kind = e
                .downcast_ref::<crate::store::UnknownName>()
                .map_or("name", |u| u.kind);
            refusal(
                StatusCode::NOT_FOUND,
                &format!("unknown_{kind}"),
                format!("{e:#}"),
            )
        }
        Ok(Err(e)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e:#}"),
        ),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
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
    name: crate::store::Named<'_>,
    force: &Force,
) -> anyhow::Result<()> {
    crate::store::require_known(store, name, force.force, Some("?force=true"))
}

impl Restriction {
    fn named(self, id: &str) -> crate::store::Named<'_> {
        match self {
            Restriction::License => crate::store::Named::License(id),
            Restriction::Account => crate::store::Named::Account(id),
        }
    }

    fn field(self) -> &'static str {
        match self {
            Restriction::License => "license",
            Restriction::Account => "account",
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
    headers: &HeaderMap,
    body: Option<&[u8]>,
) -> Response {
    if let Some(refused) = admin_refusal(&state, headers) {
        return refused;
    }
    let (imposed, default_reason, lifted) = kind.words();
    let reason = match body.map(|b| reason_of(b, default_reason)).transpose() {
        Ok(reason) => reason,
        Err(problem) => return refusal(StatusCode::BAD_REQUEST, "bad_request", problem),
    };
    let msg = if reason.is_some() { imposed } else { lifted };
    admin_change(state, move |store, now| {
        require_known(store, kind.named(&id), &force)?;
        log(json!({"level": "info", "msg": msg, kind.field(): id, "reason": reason}));
        kind.apply(store, &id, reason.as_deref(), now)
    })
    .await
}

async fn revoke(
    State(state): State<Arc<AppState>>,
    Path(license): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    restrict(
        state,
        Restriction::License,
        license,
        force,
        &headers,
        Some(&body),
    )
    .await
}

async fn unrevoke(
    State(state): State<Arc<AppState>>,
    Path(license): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
) -> Response {
    restrict(state, Restriction::License, license, force, &headers, None).await
}

async fn suspend(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    restrict(
        state,
        Restriction::Account,
        account,
        force,
        &headers,
        Some(&body),
    )
    .await
}

async fn resume(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
) -> Response {
    restrict(state, Restriction::Account, account, force, &headers, None).await
}

async fn set_budget(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
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
    admin_change(state, move |store, now| {
        require_known(store, crate::store::Named::Account(&account), &force)?;
        log(
            json!({"level": "info", "msg": "budget set", "account": account, "amount": budget.amount.to_string(), "period": budget.period.as_str()}),
        );
        store.set_budget(&account, Some(&budget), now)
    })
    .await
}

async fn remove_budget(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(force): Query<Force>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    admin_change(state, move |store, now| {
        require_known(store, crate::store::Named::Account(&account), &force)?;
        log(json!({"level": "info", "msg": "budget removed", "account": account}));
        store.set_budget(&account, None, now)
    })
    .await
}

async fn account(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = admin_refusal(&state, &headers) {
        return refused;
    }
    let worker = Arc::clone(&state);
    let status = tokio::task::spawn_blocking(move || {
        let now = worker.clock.now_ms();
        crate::control::account_status(worker.store.as_ref(), &worker.control, &account, now)
    })
    .await;
    match status {
        Ok(Ok(status)) => Json(status).into_response(),
        Ok(Err(e)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e:#}"),
        ),
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
    let worker = Arc::clone(&state);
    let answered = tokio::task::spawn_blocking(move || {
        match crate::customer::caller(&worker, &headers) {
            Some(crate::customer::Caller::Admin) => {}
            Some(crate::customer::Caller::Account(a)) if query.account.as_deref() == Some(&a) => {}
            _ => return Ok(None),
        }
        worker.store.usage(&query).map(Some)
    })
    .await;
    match answered {
        Ok(Ok(None)) => refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "usage queries need `authorization: Bearer <admin token>`, or an account token and `account=` its account",
        ),
        Ok(Ok(Some(rows))) => Json(json!({"rows": rows})).into_response(),
        Ok(Err(e)) => refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e:#}"),
        ),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
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
    (
        [("content-type", "text/plain; version=0.0.4")],
        format!(
            "{}# HELP tollgate_collector_sharing_alerts_total Licenses detected used from more clients than their plan allows (one per episode).\n# TYPE tollgate_collector_sharing_alerts_total counter\ntollgate_collector_sharing_alerts_total {}\n",
            state.metrics.render(state.group_commit.stats()),
            state.control.sharing_alerts.load(Ordering::Relaxed)
        ),
    )
        .into_response()
}
