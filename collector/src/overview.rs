//! What the dashboards show beyond usage rows and the invoice draft: an account's licenses with
//! their plan, features and limits (with the headroom left), and the operator's view of every
//! account. Storage-neutral and HTTP-free; amounts come from [`crate::billing`], the code that
//! rates invoices.

use std::collections::BTreeMap;

use anyhow::Result;
use rust_decimal::Decimal;
use serde::Serialize;
use tollgate_core::refusal::Code;
use tollgate_wire::sync::Period;
use tollgate_wire::Meter;

use crate::catalog::Catalog;
use crate::control::ControlPlane;
use crate::storage::{Granularity, QuotaState, Store, UsageQuery};

/// A limit is "near" once this share of it (percent) is used or leased.
pub const NEAR_LIMIT_PERCENT: u64 = 80;

/// One limit of a license and how much of it is left in the running period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub meter: String,
    /// The calendar period it counts over, when known.
    pub per: Option<Period>,
    pub limit: u64,
    /// Units handed out to filters in the running period (open leases plus what closed ones
    /// used): the most that can have been used.
    pub used: u64,
    pub headroom: u64,
    /// `used` as a whole percentage of `limit`, at most 100.
    pub percent: u64,
    pub period_end_ms: Option<u64>,
}

impl Limit {
    fn new(meter: String, per: Option<Period>, limit: u64, used: u64, end: Option<u64>) -> Self {
        let percent = if limit == 0 {
            100
        } else {
            u64::try_from((u128::from(used) * 100 / u128::from(limit)).min(100)).unwrap_or(100)
        };
        Limit {
            meter,
            per,
            limit,
            used,
            headroom: limit.saturating_sub(used),
            percent,
            period_end_ms: end,
        }
    }
}

/// A license of the account as its dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LicenseView {
    pub license: String,
    pub plan: String,
    pub features: Vec<String>,
    /// The license's `limits` claim (overrides of its plan's rate limits), as issued.
    pub limit_overrides: Option<serde_json::Value>,
    pub not_before_ms: u64,
    pub expires_ms: u64,
    /// `active`, `revoked`, `suspended` (the account), `expired` or `not_yet_valid`.
    pub standing: &'static str,
    /// Why it is revoked or suspended.
    pub reason: Option<String>,
    pub limits: Vec<Limit>,
}

/// The period of `period` length that a quota row's bounds are, if any.
fn period_of(catalog: &Catalog, quota: &QuotaState) -> Option<Period> {
    [Period::Hour, Period::Day, Period::Month]
        .into_iter()
        .find(|p| {
            catalog.period_bounds(*p, quota.period_start_ms)
                == (quota.period_start_ms, quota.period_end_ms)
        })
}

fn meter_named(name: &str) -> Option<Meter> {
    Meter::ALL.into_iter().find(|m| m.as_str() == name)
}

/// The limits of one license: the catalogue's quotas of its plan, and the quotas filters
/// lease for it in running periods (a lease's limit is what is enforced).
fn limits_of(
    catalog: &Catalog,
    plan: &str,
    license: &str,
    quotas: &[QuotaState],
    now_ms: u64,
) -> Vec<Limit> {
    let mut limits = Vec::new();
    let mut leased: Vec<&QuotaState> = quotas.iter().filter(|q| q.license == license).collect();
    for (meter, per, limit) in catalog.plan_quotas(plan) {
        let (start, end) = catalog.period_bounds(per, now_ms);
        let running = leased
            .iter()
            .position(|q| q.meter == meter.as_str() && q.period_start_ms == start);
        match running.map(|i| leased.remove(i)) {
            Some(q) => limits.push(Limit::new(
                q.meter.clone(),
                Some(per),
                q.limit,
                q.allocated,
                Some(q.period_end_ms),
            )),
            None => limits.push(Limit::new(
                meter.as_str().to_string(),
                Some(per),
                limit,
                0,
                Some(end),
            )),
        }
    }
    for q in leased {
        if meter_named(&q.meter).is_none() {
            continue;
        }
        limits.push(Limit::new(
            q.meter.clone(),
            period_of(catalog, q),
            q.limit,
            q.allocated,
            Some(q.period_end_ms),
        ));
    }
    limits
}

/// `account`'s issued licenses with their plan, features, limits and standing.
pub fn licenses(
    store: &dyn Store,
    control: &ControlPlane,
    account: &str,
    now_ms: u64,
) -> Result<Vec<LicenseView>> {
    let catalog = control.catalog.current();
    let issued = store.issued_licenses(Some(account))?;
    let stopped: BTreeMap<String, crate::billing::Stopped> =
        crate::billing::stopped_licenses(store, account, &issued, &[])?
            .into_iter()
            .map(|s| (s.license.clone(), s))
            .collect();
    let quotas = store.quotas(account, now_ms)?;
    Ok(issued
        .into_iter()
        .map(|l| {
            let stop = stopped.get(&l.license);
            let standing = match stop {
                Some(s) => s.standing,
                None if l.expires_ms <= now_ms => "expired",
                None if l.not_before_ms > now_ms => "not_yet_valid",
                None => "active",
            };
            LicenseView {
                limits: limits_of(&catalog, &l.plan, &l.license, &quotas, now_ms),
                license: l.license,
                plan: l.plan,
                features: l.features,
                limit_overrides: l.limits,
                not_before_ms: l.not_before_ms,
                expires_ms: l.expires_ms,
                standing,
                reason: stop.map(|s| s.reason.clone()),
            }
        })
        .collect())
}

/// Every refusal code with its words: what dashboards print beside a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusalCode {
    pub code: &'static str,
    pub status: u16,
    pub meaning: &'static str,
}

/// The refusal codes, from the filter's own list.
pub fn refusal_codes() -> Vec<RefusalCode> {
    Code::ALL
        .iter()
        .map(|c| RefusalCode {
            code: c.as_str(),
            status: c.status(),
            meaning: c.meaning(),
        })
        .collect()
}

/// One account in the operator's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountLine {
    pub account: String,
    /// The running period's invoice draft total.
    #[serde(with = "rust_decimal::serde::str")]
    pub so_far: Decimal,
    /// Its forecast at the period's end (absent once the period ended).
    #[serde(with = "rust_decimal::serde::str_option")]
    pub forecast: Option<Decimal>,
    /// Allowed calls this billing period.
    pub allowed_calls: u64,
    /// Refused calls in the last 24 hours.
    pub refused_calls: u64,
    pub suspended: Option<String>,
    pub licenses: usize,
    pub revoked_licenses: usize,
}

/// A license and its allowed calls this billing period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Consumer {
    pub account: String,
    pub license: String,
    pub allowed_calls: u64,
}

/// Refused calls of one account and code in the last 24 hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusals {
    pub account: String,
    pub code: String,
    pub meaning: Option<&'static str>,
    pub calls: u64,
}

/// A limit of a license that is at least [`NEAR_LIMIT_PERCENT`] used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NearLimit {
    pub account: String,
    pub license: String,
    #[serde(flatten)]
    pub limit: Limit,
}

/// The operator's view of every account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overview {
    pub as_of_ms: u64,
    pub currency: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    /// The period's bounds in the catalogue's time zone, RFC 3339.
    pub period_start: String,
    pub period_end: String,
    /// Sum of the accounts' draft totals.
    #[serde(with = "rust_decimal::serde::str")]
    pub revenue_so_far: Decimal,
    /// Sum of their forecasts.
    #[serde(with = "rust_decimal::serde::str")]
    pub revenue_forecast: Decimal,
    pub accounts: Vec<AccountLine>,
    /// The licenses with the most allowed calls this period, at most 10.
    pub top_consumers: Vec<Consumer>,
    /// By account and code, most first.
    pub refusals: Vec<Refusals>,
    pub near_limits: Vec<NearLimit>,
}

const DAY_MS: u64 = 86_400_000;

/// Every account with usage this billing period or an issued license: revenue so far and
/// forecast (the invoice drafts), top consumers, refusals of the last 24 hours, and licenses
/// near a limit.
pub fn overview(store: &dyn Store, control: &ControlPlane, now_ms: u64) -> Result<Overview> {
    let catalog = control.catalog.current();
    let (start, end) = catalog.period_bounds(catalog.billing_period, now_ms);
    let calls = |from_ms: u64| {
        store.usage(&UsageQuery {
            meter: Some(Meter::Calls.as_str().to_string()),
            from_ms: Some(from_ms),
            granularity: Some(Granularity::Month),
            ..UsageQuery::default()
        })
    };
    let mut allowed: BTreeMap<(String, String), u64> = BTreeMap::new();
    for row in calls(start)?.into_iter().filter(|r| r.outcome == "allowed") {
        *allowed.entry((row.account, row.license)).or_insert(0) += row.units;
    }
    let mut refused: BTreeMap<(String, String), u64> = BTreeMap::new();
    for row in calls(now_ms.saturating_sub(DAY_MS))?
        .into_iter()
        .filter(|r| r.outcome != "allowed")
    {
        *refused.entry((row.account, row.outcome)).or_insert(0) += row.units;
    }
    let mut accounts = Vec::new();
    let mut near_limits = Vec::new();
    let (mut so_far, mut forecast) = (Decimal::ZERO, Decimal::ZERO);
    for account in store.accounts(start, end)? {
        let draft = crate::billing::draft(store, &catalog, &account, now_ms, now_ms)?;
        so_far += draft.invoice.total;
        forecast += draft.forecast_total.unwrap_or(draft.invoice.total);
        let views = licenses(store, control, &account, now_ms)?;
        for v in &views {
            for l in &v.limits {
                if l.percent >= NEAR_LIMIT_PERCENT {
                    near_limits.push(NearLimit {
                        account: account.clone(),
                        license: v.license.clone(),
                        limit: l.clone(),
                    });
                }
            }
        }
        let restrictions = store.restrictions(&[], std::slice::from_ref(&account))?;
        accounts.push(AccountLine {
            so_far: draft.invoice.total,
            forecast: draft.forecast_total,
            allowed_calls: allowed
                .iter()
                .filter(|((a, _), _)| *a == account)
                .map(|(_, n)| n)
                .sum(),
            refused_calls: refused
                .iter()
                .filter(|((a, _), _)| *a == account)
                .map(|(_, n)| n)
                .sum(),
            suspended: restrictions.suspended.get(&account).cloned(),
            licenses: views.len(),
            revoked_licenses: views.iter().filter(|v| v.standing == "revoked").count(),
            account,
        });
    }
    let mut top_consumers: Vec<Consumer> = allowed
        .into_iter()
        .map(|((account, license), allowed_calls)| Consumer {
            account,
            license,
            allowed_calls,
        })
        .collect();
    top_consumers.sort_by_key(|c| std::cmp::Reverse(c.allowed_calls));
    top_consumers.truncate(10);
    let mut refusals: Vec<Refusals> = refused
        .into_iter()
        .map(|((account, code), calls)| Refusals {
            meaning: Code::named(&code).map(Code::meaning),
            account,
            code,
            calls,
        })
        .collect();
    refusals.sort_by_key(|r| std::cmp::Reverse(r.calls));
    near_limits.sort_by_key(|n| std::cmp::Reverse(n.limit.percent));
    Ok(Overview {
        as_of_ms: now_ms,
        currency: catalog.currency.clone(),
        period_start_ms: start,
        period_end_ms: end,
        period_start: crate::billing::rfc3339(catalog.time_zone, start),
        period_end: crate::billing::rfc3339(catalog.time_zone, end),
        revenue_so_far: so_far,
        revenue_forecast: forecast,
        accounts,
        top_consumers,
        refusals,
        near_limits,
    })
}
