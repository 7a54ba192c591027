//! What the collector's request handlers and its worker share: the store, the control plane,
//! the settings the collector was started with, and its counters. It sits above the domain
//! modules (it holds their types) and below `http` and `worker` (they take it), so that no
//! domain module imports it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::Clock;
use crate::control::ControlPlane;
use crate::group_commit::GroupCommit;
use crate::health::Readiness;
use crate::licensing::Issuer;
use crate::storage::Store;
use crate::telemetry::metrics::Metrics;
use crate::webhooks::WebhookSettings;

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub keys: IngestKeys,
    pub metrics: Metrics,
    pub control: ControlPlane,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// The `iss` and `aud` of the licenses issued here.
    pub issuer: Issuer,
    /// Where events go; `None`: no webhooks (and no spend-threshold events).
    pub webhooks: Option<WebhookSettings>,
    pub billing: BillingSettings,
    /// What `/readyz` answers, kept by [`crate::health::Prober`] while [`crate::serve`] runs.
    pub readiness: Arc<Readiness>,
    /// The wall clock every decision reads.
    pub clock: Arc<Clock>,
    /// Batches arriving together are stored in one transaction.
    pub group_commit: GroupCommit,
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
            issuer: Issuer::default(),
            webhooks: None,
            billing: BillingSettings::default(),
            readiness: Arc::default(),
            clock: Arc::default(),
            group_commit: Default::default(),
        }
    }
}

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

    pub(crate) fn secret(&self, id: &str) -> Option<&[u8]> {
        self.0.get(id).map(Vec::as_slice)
    }
}

/// What the worker does, and how often.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Finalise a period's invoices this long after it ended (late usage from filters that
    /// were cut off still counts until then); `None`: only on request.
    pub finalize_grace_ms: Option<u64>,
    /// Percentages of a budget that raise `spend.threshold_crossed`.
    pub thresholds: Vec<u32>,
    /// How often the worker runs.
    pub interval_ms: u64,
    /// How often budgets are checked (each check rates every budgeted account's period).
    pub budget_check_ms: u64,
    /// Raw usage older than this is rolled up and deleted ([`crate::privacy`]); `None`: kept.
    pub raw_usage_retention_ms: Option<u64>,
    /// How often retention runs.
    pub retention_every_ms: u64,
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            finalize_grace_ms: Some(3_600_000),
            thresholds: vec![50, 80, 100],
            interval_ms: 1000,
            budget_check_ms: 5000,
            raw_usage_retention_ms: None,
            retention_every_ms: 3_600_000,
        }
    }
}
