//! The collector's background work, on every replica: deliver due webhook events, notice
//! budgets whose spend crossed a threshold, and finalise the invoices of the billing period
//! that ended. Everything it writes has a stable id, so replicas doing it at the same time
//! write each thing once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rust_decimal::Decimal;
use serde_json::json;

use crate::server::log;
use crate::AppState;

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
}

impl Default for BillingSettings {
    fn default() -> Self {
        BillingSettings {
            finalize_grace_ms: Some(3_600_000),
            thresholds: vec![50, 80, 100],
            interval_ms: 1000,
            budget_check_ms: 5000,
        }
    }
}

/// The worker's memory of what it already did (its writes are idempotent; this only saves
/// repeating them).
#[derive(Default)]
pub struct Worker {
    thresholds_raised: HashSet<String>,
    finalized: HashSet<(String, u64)>,
    next_budget_check_ms: u64,
}

impl Worker {
    /// One round at `now_ms`.
    pub fn step(&mut self, state: &AppState, now_ms: u64) -> Result<()> {
        let store = state.store.as_ref();
        let catalog = state.control.catalog.current();
        if let Some(webhooks) = &state.webhooks {
            crate::webhooks::deliver_due(store, webhooks, now_ms)?;
            if now_ms >= self.next_budget_check_ms {
                self.next_budget_check_ms = now_ms.saturating_add(state.billing.budget_check_ms);
                self.check_budgets(state, now_ms)?;
            }
        }
        if let Some(grace) = state.billing.finalize_grace_ms {
            let (current_start, _) = catalog.period_bounds(catalog.billing_period, now_ms);
            let last_ms = current_start.saturating_sub(1);
            let (start, end) = catalog.period_bounds(catalog.billing_period, last_ms);
            if now_ms >= end.saturating_add(grace) {
                for account in store.accounts(start, end)? {
                    if self.finalized.contains(&(account.clone(), start)) {
                        continue;
                    }
                    let (invoice, new) = crate::billing::finalize(
                        store,
                        &catalog,
                        &account,
                        last_ms,
                        now_ms,
                        state.webhooks.is_some(),
                    )?;
                    if new {
                        log(
                            json!({"level": "info", "msg": "invoice finalised", "invoice_id": invoice.invoice_id, "total": invoice.total, "currency": invoice.currency}),
                        );
                    }
                    self.finalized.insert((account, start));
                }
            }
        }
        Ok(())
    }

    fn check_budgets(&mut self, state: &AppState, now_ms: u64) -> Result<()> {
        let store = state.store.as_ref();
        let catalog = state.control.catalog.current();
        for (account, budget) in store.budgets()? {
            if budget.amount <= Decimal::ZERO {
                continue;
            }
            let (spent, (start, end)) =
                crate::control::spend(store, &catalog, &account, budget.period, now_ms)?;
            for percent in &state.billing.thresholds {
                let threshold = budget.amount * Decimal::from(*percent) / Decimal::from(100);
                if spent < threshold {
                    continue;
                }
                let id = format!("spend.threshold:{account}:{start}:{percent}");
                if self.thresholds_raised.contains(&id) {
                    continue;
                }
                let event = crate::webhooks::event(
                    id.clone(),
                    "spend.threshold_crossed",
                    json!({
                        "account": account,
                        "threshold_percent": percent,
                        "spent": spent.round_dp(crate::billing::minor_units(&catalog.currency)).to_string(),
                        "budget": budget.amount.to_string(),
                        "currency": catalog.currency,
                        "period": budget.period.as_str(),
                        "period_start_ms": start,
                        "period_end_ms": end,
                    }),
                    now_ms,
                );
                if store.enqueue_event(&event)? {
                    log(
                        json!({"level": "info", "msg": "spend threshold crossed", "account": account, "percent": percent}),
                    );
                }
                self.thresholds_raised.insert(id);
            }
        }
        Ok(())
    }
}

/// Run the worker until the runtime stops.
pub async fn run(state: Arc<AppState>) {
    let mut worker = Worker::default();
    let interval = Duration::from_millis(state.billing.interval_ms.max(10));
    loop {
        tokio::time::sleep(interval).await;
        let shared = Arc::clone(&state);
        let taken = std::mem::take(&mut worker);
        let done = tokio::task::spawn_blocking(move || {
            let mut worker = taken;
            let now = u64::try_from(crate::store::now_ms()).unwrap_or(0);
            let result = worker.step(&shared, now);
            (worker, result)
        })
        .await;
        match done {
            Ok((back, result)) => {
                worker = back;
                if let Err(e) = result {
                    log(
                        json!({"level": "error", "msg": "billing worker round failed", "error": format!("{e:#}")}),
                    );
                }
            }
            Err(e) => {
                log(
                    json!({"level": "error", "msg": "billing worker round failed", "error": e.to_string()}),
                );
            }
        }
    }
}
