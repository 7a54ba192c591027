//! The control plane filters sync with: quota leases out of the collector's counts, and the
//! licenses and accounts to refuse (revoked, suspended, over their spend cap). Storage-neutral:
//! the transactional parts are the [`Store`]'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use tollgate_wire::sync::{
    Denial, DenialCode, LicenseSeen, Period, SeatRule, SyncRequest, SyncResponse,
};
use tollgate_wire::VERSION;

use crate::billing::LineKind;
use crate::catalog::{Catalog, CatalogFileWatch};
use crate::storage::{Budget, LeaseAsk, SeatAsk, SharingDetection, Store};

/// Default lease time to live: a filter comes back at least this often while it uses a lease,
/// which bounds how long stale limits and unreturned units stay with it.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;
/// Default seat grant time to live: a filter renews an active user's seat this often (in the
/// second half of a grant), which bounds how long a revoked seat or a changed limit takes to
/// reach it, and, for floating seats, is at most the window.
pub const DEFAULT_SEAT_TTL_MS: u64 = 30_000;

/// The control plane's settings.
pub struct ControlPlane {
    pub catalog: CatalogFileWatch,
    pub lease_ttl_ms: u64,
    pub seat_ttl_ms: u64,
    /// Sharing detections raised since the start (for `/metrics`).
    pub sharing_alerts: AtomicU64,
    /// The licenses' plans this collector stored lately, so that a sync stores only news.
    pub licenses_recorded: LicensesRecorded,
}

/// How long a license's account and plan, once stored, are not stored again while filters keep
/// naming them unchanged. A sync used to store every license it named, one write transaction
/// (and fsync) per sync, which made syncs queue behind each other and behind ingest. What is
/// stored is what billing prices a license with; the time it was last seen is read by nothing.
/// Refreshing after this long undoes, within it, a change stored elsewhere while filters keep
/// naming the license: another replica's (a license reissued on a new plan and named by a
/// filter of that replica), an issuance's here, or an erasure made while it was still in use.
pub const LICENSE_REFRESH_MS: u64 = 60_000;
/// Beyond this many licenses the memo starts again (bounded memory; the cost is one write per
/// license named afterwards).
const LICENSES_REMEMBERED: usize = 200_000;

/// License -> (account, plan, when stored), for [`LICENSE_REFRESH_MS`].
#[derive(Default)]
pub struct LicensesRecorded(Mutex<HashMap<String, (String, String, u64)>>);

impl LicensesRecorded {
    fn memo(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, String, u64)>> {
        // The map is rebuilt by use: a panic elsewhere leaves nothing to protect.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Of `seen`, the licenses to store now: not stored by this collector within
    /// [`LICENSE_REFRESH_MS`], or stored with another account or plan.
    fn due(&self, seen: &[LicenseSeen], now_ms: u64) -> Vec<LicenseSeen> {
        let memo = self.memo();
        seen.iter()
            .filter(|l| {
                memo.get(&l.license).is_none_or(|(account, plan, at)| {
                    *account != l.account
                        || *plan != l.plan
                        || now_ms.saturating_sub(*at) >= LICENSE_REFRESH_MS
                })
            })
            .cloned()
            .collect()
    }

    /// `stored` was committed at `now_ms`.
    fn stored(&self, stored: &[LicenseSeen], now_ms: u64) {
        let mut memo = self.memo();
        if memo.len() + stored.len() > LICENSES_REMEMBERED {
            memo.clear();
        }
        for l in stored {
            memo.insert(
                l.license.clone(),
                (l.account.clone(), l.plan.clone(), now_ms),
            );
        }
    }

    /// Store every license again when next named (after an erasure).
    pub fn forget(&self) {
        self.memo().clear();
    }
}

impl Default for ControlPlane {
    fn default() -> Self {
        ControlPlane {
            catalog: CatalogFileWatch::empty(),
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            seat_ttl_ms: DEFAULT_SEAT_TTL_MS,
            sharing_alerts: AtomicU64::new(0),
            licenses_recorded: LicensesRecorded::default(),
        }
    }
}

/// One account's standing: what a customer or an operator is shown, and what decides a spend
/// cap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountStatus {
    pub account: String,
    /// Why the account is suspended, if it is.
    pub suspended: Option<String>,
    pub budget: Option<Budget>,
    /// Spend in the budget's period (the current month without a budget).
    #[serde(with = "rust_decimal::serde::str")]
    pub spend: Decimal,
    pub currency: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    /// True when the spend has reached the budget: requests are refused until the period ends.
    pub spend_cap_reached: bool,
}

/// How long a period is, in order.
fn rank(period: Period) -> u8 {
    match period {
        Period::Hour => 0,
        Period::Day => 1,
        Period::Month => 2,
    }
}

/// What `account` spent in the calendar `period` containing `now_ms`: the usage charges that
/// its allowed usage in that window added to its invoices (included units, tiers and caps
/// counted over the billing period, as the invoice counts them), without fees or minimums,
/// which are not spending. Usage of a license whose plan the catalogue does not price costs
/// zero.
///
/// - A budget period no longer than the billing period lies inside one billing period: its
///   spend is the usage charges of that billing period up to the window's end, minus those up
///   to its start (a daily budget under monthly billing with 100,000 calls included spends
///   nothing until the month's included calls are used).
/// - A longer budget period holds whole billing periods: their usage charges, summed.
pub fn spend(
    store: &dyn Store,
    catalog: &Catalog,
    account: &str,
    period: Period,
    now_ms: u64,
) -> Result<(Decimal, (u64, u64))> {
    let window = catalog.period_bounds(period, now_ms);
    let billing = catalog.billing_period;
    // The usage charges of the billing period starting at `start`, for windows up to `to`.
    let charges = |start: u64, to: u64| -> Result<Decimal> {
        if to <= start {
            return Ok(Decimal::ZERO);
        }
        let bounds = catalog.period_bounds(billing, start);
        let usage = store.billable_usage(account, start, to.min(bounds.1), None)?;
        let users = store
            .active_users(account, start, to.min(bounds.1), None)?
            .by_license;
        let invoice =
            crate::billing::rate_with_users(catalog, account, bounds, &usage, &[], &[], &users)?;
        Ok(invoice
            .lines
            .iter()
            .filter(|l| {
                matches!(
                    l.kind,
                    LineKind::Usage | LineKind::ActiveUsers | LineKind::Cap
                )
            })
            .map(|l| l.amount)
            .sum())
    };
    let total = if rank(period) <= rank(billing) {
        let (start, _) = catalog.period_bounds(billing, window.0);
        charges(start, window.1)? - charges(start, window.0)?
    } else {
        let mut total = Decimal::ZERO;
        let mut start = window.0;
        while start < window.1 && start <= now_ms {
            let (from, to) = catalog.period_bounds(billing, start);
            total += charges(from, to)?;
            start = to;
        }
        total
    };
    Ok((total, window))
}

/// An account's users: distinct active users in the current billing period (by license and
/// feature), the seats taken now, and sharing detections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsersReport {
    pub account: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    pub active_users: crate::storage::ActiveUsers,
    pub seats: Vec<crate::storage::SeatUse>,
    pub sharing: Vec<SharingDetection>,
}

pub fn users_report(
    store: &dyn Store,
    control: &ControlPlane,
    account: &str,
    now_ms: u64,
) -> Result<UsersReport> {
    let catalog = control.catalog.current();
    let (start, end) = catalog.period_bounds(catalog.billing_period, now_ms);
    Ok(UsersReport {
        account: account.to_string(),
        period_start_ms: start,
        period_end_ms: end,
        active_users: store.active_users(account, start, end, None)?,
        seats: store.seat_use(account, now_ms)?,
        sharing: store.sharing_detections(Some(account))?,
    })
}

/// An account's standing now.
pub fn account_status(
    store: &dyn Store,
    control: &ControlPlane,
    account: &str,
    now_ms: u64,
) -> Result<AccountStatus> {
    let catalog = control.catalog.current();
    let restrictions = store.restrictions(&[], &[account.to_string()])?;
    let budget = restrictions.budgets.get(account).cloned();
    let period = budget.as_ref().map_or(Period::Month, |b| b.period);
    let (spent, (start, end)) = spend(store, &catalog, account, period, now_ms)?;
    Ok(AccountStatus {
        account: account.to_string(),
        suspended: restrictions.suspended.get(account).cloned(),
        spend_cap_reached: budget.as_ref().is_some_and(|b| spent >= b.amount),
        budget,
        spend: spent,
        currency: catalog.currency.clone(),
        period_start_ms: start,
        period_end_ms: end,
    })
}

/// Answer a filter's sync: close the returned leases, remember the licenses' plans, work out
/// which of the named licenses must be refused, and grant leases to the others.
pub fn sync(
    store: &dyn Store,
    control: &ControlPlane,
    request: &SyncRequest,
    now_ms: u64,
) -> Result<SyncResponse> {
    let catalog = control.catalog.current();
    let mut closed = Vec::new();
    for r in &request.returns {
        if store.close_lease(&r.lease_id, r.used, now_ms)? {
            closed.push(r.lease_id.clone());
        }
    }
    let news = control.licenses_recorded.due(&request.licenses, now_ms);
    if !news.is_empty() {
        store.record_licenses(&news, now_ms)?;
        control.licenses_recorded.stored(&news, now_ms);
    }
    // Clients first: a block found now refuses the license in this very answer.
    for seen in &request.clients {
        let clients = store.note_clients(seen, now_ms)?;
        if clients > seen.max_clients {
            detect_sharing(store, control, seen, clients, now_ms)?;
        }
    }

    // Every (account, license) the request names.
    let mut named: BTreeSet<(String, String)> = request
        .licenses
        .iter()
        .map(|l| (l.account.clone(), l.license.clone()))
        .collect();
    named.extend(
        request
            .leases
            .iter()
            .map(|l| (l.account.clone(), l.license.clone())),
    );
    named.extend(
        request
            .seats
            .iter()
            .map(|s| (s.account.clone(), s.license.clone())),
    );
    let licenses: Vec<String> = named.iter().map(|(_, l)| l.clone()).collect();
    let accounts: Vec<String> = named
        .iter()
        .map(|(a, _)| a.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let restrictions = store.restrictions(&licenses, &accounts)?;
    let mut capped: BTreeMap<String, Denial> = BTreeMap::new();
    for (account, budget) in &restrictions.budgets {
        let (spent, (_, end)) = spend(store, &catalog, account, budget.period, now_ms)?;
        if spent >= budget.amount {
            capped.insert(
                account.clone(),
                Denial {
                    account: account.clone(),
                    license: String::new(),
                    code: DenialCode::SpendCapReached,
                    message: format!(
                        "account {account} spent {} {} of its {} {} budget this {}",
                        spent.round_dp(2),
                        catalog.currency,
                        budget.amount,
                        catalog.currency,
                        budget.period.as_str()
                    ),
                    until_ms: Some(end),
                },
            );
        }
    }
    let mut denials = Vec::new();
    let mut denied: BTreeSet<(String, String)> = BTreeSet::new();
    for (account, license) in &named {
        let sharing = restrictions.sharing_blocks.get(license).and_then(|d| {
            d.blocked_until_ms
                .filter(|until| *until > now_ms)
                .map(|until| (d, until))
        });
        let denial = if let Some(reason) = restrictions.revoked.get(license) {
            Some(Denial {
                account: account.clone(),
                license: license.clone(),
                code: DenialCode::LicenseRevoked,
                message: format!("license {license} was revoked: {reason}"),
                until_ms: None,
            })
        } else if let Some(reason) = restrictions.suspended.get(account) {
            Some(Denial {
                account: account.clone(),
                license: license.clone(),
                code: DenialCode::AccountSuspended,
                message: format!("account {account} is suspended: {reason}"),
                until_ms: None,
            })
        } else if let Some((detection, until)) = sharing {
            Some(Denial {
                account: account.clone(),
                license: license.clone(),
                code: DenialCode::LicenseSharingDetected,
                message: format!(
                    "license {license} was used from {} distinct clients within {} s; its plan allows {}",
                    detection.clients,
                    detection.window_ms / 1000,
                    detection.max_clients
                ),
                until_ms: Some(until),
            })
        } else {
            capped.get(account).map(|d| Denial {
                license: license.clone(),
                ..d.clone()
            })
        };
        if let Some(denial) = denial {
            denied.insert((account.clone(), license.clone()));
            denials.push(denial);
        }
    }

    let mut grants = Vec::with_capacity(request.leases.len());
    for lease in &request.leases {
        let (start, end) = catalog.period_bounds(lease.period, now_ms);
        let expires_ms = now_ms.saturating_add(control.lease_ttl_ms).min(end);
        if denied.contains(&(lease.account.clone(), lease.license.clone())) {
            // A refused license gets no grant and nothing is allocated; a grant of 0 would
            // read as "quota used up" until the period's end, also after the denial is lifted.
            continue;
        }
        let limit = catalog
            .quota_limit(&lease.plan, lease.meter, lease.period)
            .unwrap_or(lease.limit);
        grants.push(store.grant_lease(
            &LeaseAsk {
                holder: &request.instance,
                request: lease,
                limit,
                period_start_ms: start,
                period_end_ms: end,
                expires_ms,
            },
            now_ms,
        )?);
    }
    let mut seats = Vec::with_capacity(request.seats.len());
    for seat in &request.seats {
        // A refused license gets no seat answer: the denial refuses its requests already.
        if denied.contains(&(seat.account.clone(), seat.license.clone())) {
            continue;
        }
        let (period_start_ms, period_end_ms) = match seat.rule {
            SeatRule::Named { per, .. } => catalog.period_bounds(per, now_ms),
            SeatRule::Floating { .. } => (0, u64::MAX),
        };
        seats.push(store.take_seat(
            &SeatAsk {
                request: seat,
                period_start_ms,
                period_end_ms,
                ttl_ms: control.seat_ttl_ms.max(1),
            },
            now_ms,
        )?);
    }
    Ok(SyncResponse {
        version: VERSION,
        grants,
        closed,
        denials,
        seats,
    })
}

/// A license was used from more clients than its plan allows: record it, and for a new
/// episode (none within the window) raise the alert, a webhook event and a metric.
fn detect_sharing(
    store: &dyn Store,
    control: &ControlPlane,
    seen: &tollgate_wire::sync::ClientsSeen,
    clients: u32,
    now_ms: u64,
) -> Result<()> {
    let detection = SharingDetection {
        license: seen.license.clone(),
        account: seen.account.clone(),
        clients,
        max_clients: seen.max_clients,
        window_ms: seen.window_ms,
        detected_ms: now_ms,
        blocked_until_ms: seen.block.then(|| now_ms.saturating_add(seen.window_ms)),
    };
    if !store.detect_sharing(&detection)? {
        return Ok(());
    }
    control.sharing_alerts.fetch_add(1, Ordering::Relaxed);
    let event = crate::webhooks::event(
        format!("license.sharing_detected:{}:{now_ms}", seen.license),
        "license.sharing_detected",
        json!({
            "account": seen.account,
            "license": seen.license,
            "clients": clients,
            "max_clients": seen.max_clients,
            "window_seconds": seen.window_ms / 1000,
            "blocked_until_ms": detection.blocked_until_ms,
            "detected_ms": now_ms,
        }),
        now_ms,
    );
    store.enqueue_event(&event)?;
    tracing::warn!(account = %seen.account, license = %seen.license, clients = clients, max_clients = seen.max_clients, blocked = seen.block, "license sharing detected");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn seen(license: &str, plan: &str) -> LicenseSeen {
        LicenseSeen {
            account: "acme".into(),
            license: license.into(),
            plan: plan.into(),
        }
    }

    fn names(due: &[LicenseSeen]) -> Vec<&str> {
        due.iter().map(|l| l.license.as_str()).collect()
    }

    #[test]
    fn a_license_is_stored_again_only_when_it_changed_or_its_refresh_is_due() {
        let memo = LicensesRecorded::default();
        let both = [seen("a", "pro"), seen("b", "pro")];
        assert_eq!(names(&memo.due(&both, 1_000)), ["a", "b"], "new ones");
        memo.stored(&both, 1_000);
        assert!(memo.due(&both, 1_000 + LICENSE_REFRESH_MS - 1).is_empty());
        let changed = [seen("a", "enterprise"), seen("b", "pro")];
        assert_eq!(names(&memo.due(&changed, 2_000)), ["a"], "a new plan");
        let moved = LicenseSeen {
            account: "globex".into(),
            ..seen("b", "pro")
        };
        assert_eq!(names(&memo.due(&[moved], 2_000)), ["b"], "a new account");
        assert_eq!(
            names(&memo.due(&both, 1_000 + LICENSE_REFRESH_MS)),
            ["a", "b"],
            "refreshed"
        );
        memo.forget();
        assert_eq!(names(&memo.due(&both, 2_000)), ["a", "b"], "forgotten");
    }

    #[test]
    fn the_memo_is_bounded() {
        let memo = LicensesRecorded::default();
        let many: Vec<LicenseSeen> = (0..LICENSES_REMEMBERED)
            .map(|i| seen(&format!("l{i}"), "pro"))
            .collect();
        memo.stored(&many, 0);
        assert_eq!(memo.memo().len(), LICENSES_REMEMBERED);
        memo.stored(&[seen("one-more", "pro")], 0);
        assert_eq!(memo.memo().len(), 1);
    }
}
