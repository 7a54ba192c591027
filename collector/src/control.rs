//! The control plane filters sync with: quota leases out of the collector's counts, and the
//! licenses and accounts to refuse (revoked, suspended, over their spend cap). Storage-neutral:
//! the transactional parts are the [`Store`]'s.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use tollgate_wire::sync::{Denial, DenialCode, Period, SyncRequest, SyncResponse};
use tollgate_wire::VERSION;

use crate::billing::LineKind;
use crate::catalog::{Catalog, CatalogFileWatch};
use crate::store::{Budget, LeaseAsk, Store};

/// Default lease time to live: a filter comes back at least this often while it uses a lease,
/// which bounds how long stale limits and unreturned units stay with it.
pub const DEFAULT_LEASE_TTL_MS: u64 = 10_000;

/// The control plane's settings.
pub struct ControlPlane {
    pub catalog: CatalogFileWatch,
    pub lease_ttl_ms: u64,
}

impl Default for ControlPlane {
    fn default() -> Self {
        ControlPlane {
            catalog: CatalogFileWatch::empty(),
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
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
        let invoice = crate::billing::rate(catalog, account, bounds, &usage, &[], &[])?;
        Ok(invoice
            .lines
            .iter()
            .filter(|l| matches!(l.kind, LineKind::Usage | LineKind::Cap))
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
    store.record_licenses(&request.licenses, now_ms)?;

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
    Ok(SyncResponse {
        version: VERSION,
        grants,
        closed,
        denials,
    })
}
