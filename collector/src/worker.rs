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

use crate::state::AppState;
use crate::storage::Store;

pub use crate::state::BillingSettings;

/// The worker's memory of what it already did (its writes are idempotent; this only saves
/// repeating them, and repeating the same error every round).
#[derive(Default)]
pub struct Worker {
    thresholds_raised: HashSet<String>,
    /// Billing periods (by start) whose every account was finalised, or failed once. Emptied
    /// every hour: an account whose only usage of a period arrived after the period was done
    /// gets its invoice then.
    periods_done: HashSet<u64>,
    periods_done_until_ms: u64,
    next_budget_check_ms: u64,
    next_retention_ms: u64,
    /// The wall time of the last round, and the monotonic instant it was read at: a wall clock
    /// that moved back against the monotonic one was stepped.
    last_round: Option<(u64, std::time::Instant)>,
}

/// A wall clock this far behind the monotonic one since the last round was stepped back (NTP
/// slews smaller errors).
const STEP_BACK_MS: u64 = 2_000;

impl Worker {
    /// After the wall clock stepped back, what was scheduled on the old time would wait the
    /// step out: budget checks, retention and the finalised-periods memory start over, and
    /// pending webhook retries become due now (sent sooner than their backoff, not an hour
    /// late). A step forward needs nothing: what was due comes due sooner.
    fn notice_a_step_back(&mut self, store: &dyn Store, now_ms: u64) {
        let now = std::time::Instant::now();
        let previous = self.last_round.replace((now_ms, now));
        let Some((wall, at)) = previous else {
            return;
        };
        let elapsed = u64::try_from(now.duration_since(at).as_millis()).unwrap_or(u64::MAX);
        let expected = wall.saturating_add(elapsed);
        let back_by = expected.saturating_sub(now_ms);
        if back_by < STEP_BACK_MS {
            return;
        }
        self.next_budget_check_ms = 0;
        self.next_retention_ms = 0;
        self.periods_done_until_ms = 0;
        let moved = store.webhooks_due_now(now_ms);
        const STEPPED_BACK: &str =
            "the clock stepped back: schedules start over, pending webhooks are due now";
        match moved {
            Ok(moved) => tracing::warn!(back_by_ms = back_by, webhooks_moved = moved, STEPPED_BACK),
            Err(e) => tracing::warn!(back_by_ms = back_by, error = %format!("{e:#}"), STEPPED_BACK),
        }
    }
}

/// Billing periods looked at behind the last one that ended, after a worker was down.
const CATCH_UP_PERIODS: usize = 3;

impl Worker {
    /// One round at `now_ms`. An account that fails is logged and skipped; the others go on.
    pub fn step(&mut self, state: &AppState, now_ms: u64) -> Result<()> {
        let store = state.store.as_ref();
        let catalog = state.control.catalog.current();
        self.notice_a_step_back(store, now_ms);
        if let Some(webhooks) = &state.webhooks {
            if let Err(e) = crate::webhooks::deliver_due(store, webhooks, &state.clock, now_ms) {
                tracing::error!(error = %format!("{e:#}"), "webhook delivery round failed");
            }
            if now_ms >= self.next_budget_check_ms {
                self.next_budget_check_ms = now_ms.saturating_add(state.billing.budget_check_ms);
                self.check_budgets(state, now_ms)?;
            }
        }
        if let Some(age) = state.billing.raw_usage_retention_ms {
            if now_ms >= self.next_retention_ms {
                self.next_retention_ms = now_ms.saturating_add(state.billing.retention_every_ms);
                self.retain(store, now_ms.saturating_sub(age));
            }
        }
        if let Some(grace) = state.billing.finalize_grace_ms {
            // The periods that ended at least `grace` ago: the last of them, and a few before
            // it, oldest first (periods are finalised in order).
            if now_ms >= self.periods_done_until_ms {
                self.periods_done.clear();
                self.periods_done_until_ms = now_ms.saturating_add(3_600_000);
            }
            let cutoff = now_ms.saturating_sub(grace);
            let mut periods = Vec::new();
            let mut next_end = catalog.period_bounds(catalog.billing_period, cutoff).0;
            for _ in 0..=CATCH_UP_PERIODS {
                if next_end == 0 {
                    break;
                }
                let bounds = catalog.period_bounds(catalog.billing_period, next_end - 1);
                periods.push(bounds);
                next_end = bounds.0;
            }
            for (start, end) in periods.into_iter().rev() {
                if self.periods_done.contains(&start) {
                    continue;
                }
                for account in store.accounts(start, end)? {
                    match crate::billing::finalize_in_order(
                        store, &catalog, &account, start, now_ms,
                    ) {
                        Ok(finalized) => {
                            for (invoice, new) in finalized {
                                if new {
                                    tracing::info!(invoice_id = %invoice.invoice_id, total = %invoice.total, currency = %invoice.currency, "invoice finalised");
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(account = %account, period_start_ms = start, error = %format!("{e:#}"), "invoice not finalised")
                        }
                    }
                }
                self.periods_done.insert(start);
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
            let (spent, (start, end)) = match crate::control::spend(
                store,
                &catalog,
                &account,
                budget.period,
                now_ms,
            ) {
                Ok(spent) => spent,
                Err(e) => {
                    tracing::error!(account = %account, error = %format!("{e:#}"), "spend not computed");
                    continue;
                }
            };
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
                    tracing::info!(account = %account, percent = percent, "spend threshold crossed");
                }
                self.thresholds_raised.insert(id);
            }
        }
        Ok(())
    }
}

impl Worker {
    /// Retention up to `before_ms`; a failure is logged, and tried again next time.
    fn retain(&mut self, store: &dyn crate::Store, before_ms: u64) {
        match crate::privacy::apply_retention(store, before_ms, 100) {
            Ok(done) if done == crate::privacy::Retained::default() => {}
            Ok(done) => {
                tracing::info!(before_ms = before_ms, retained = %serde_json::json!(done), "retention: raw usage rolled up and deleted")
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "retention round failed"),
        }
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
            let now = shared.clock.now_ms();
            let result = worker.step(&shared, now);
            (worker, result)
        })
        .await;
        match done {
            Ok((back, result)) => {
                worker = back;
                state.metrics.worker_rounds.inc();
                if let Err(e) = result {
                    tracing::error!(error = %format!("{e:#}"), "billing worker round failed");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "billing worker round failed");
            }
        }
    }
}
