//! The collector's plan catalogue: the time zone calendar periods are counted in, the currency,
//! and each plan's price per unit of each meter (what spend caps are checked against). Read
//! from a JSON file, and read again when the file changes, so operators change prices without
//! a restart.
//!
//! ```json
//! {
//!   "time_zone": "Europe/Berlin",
//!   "currency": "EUR",
//!   "plans": {
//!     "pro": {"prices": {"calls": "0.001", "processing_ns": {"amount": "15", "per": 3600000000000}}}
//!   }
//! }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Datelike, NaiveDate, Offset, TimeZone};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_wire::sync::Period;
use tollgate_wire::Meter;

/// A price as written: a decimal per unit, or an object (`amount` per `per` units, or
/// `tiers`), with an optional `cap` on what it charges per invoice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum PriceSpec {
    PerUnit(Decimal),
    Detailed(PriceObject),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceObject {
    #[serde(default)]
    amount: Option<Decimal>,
    /// The units `amount` (or each tier's `amount`) is the price of; default 1.
    #[serde(default)]
    per: Option<u64>,
    #[serde(default)]
    tiers: Option<Vec<TierSpec>>,
    #[serde(default)]
    mode: TierMode,
    #[serde(default)]
    cap: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct TierSpec {
    /// The last unit of the tier (inclusive); absent on the last tier.
    #[serde(default)]
    up_to: Option<u64>,
    amount: Decimal,
    /// A fixed charge when the tier is reached.
    #[serde(default)]
    flat: Option<Decimal>,
}

/// How tiers apply: `graduated`, each unit at the price of the tier it falls in; `volume`,
/// every unit at the price of the tier the total falls in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    #[default]
    Graduated,
    Volume,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionSpec {
    fee: Decimal,
    /// Units of each meter the fee includes, per license and billing period.
    #[serde(default)]
    included: BTreeMap<Meter, u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeaturePricesSpec {
    #[serde(default)]
    prices: BTreeMap<Meter, PriceSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    subscription: Option<SubscriptionSpec>,
    #[serde(default)]
    prices: BTreeMap<Meter, PriceSpec>,
    /// Prices of one feature's usage, instead of the plan's for those meters.
    #[serde(default)]
    features: BTreeMap<String, FeaturePricesSpec>,
    /// The least a license of this plan is invoiced per billing period.
    #[serde(default)]
    minimum: Option<Decimal>,
    /// Quota limits that override the filters' configuration for this plan.
    #[serde(default)]
    quotas: BTreeMap<Meter, QuotaSpec>,
    /// The price of each distinct active end user of a license per billing period (tiers
    /// allowed: a first tier at 0 includes users).
    #[serde(default)]
    active_users: Option<PriceSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaSpec {
    per: Period,
    limit: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default = "default_time_zone")]
    time_zone: String,
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default = "default_billing_period")]
    billing_period: Period,
    #[serde(default)]
    plans: BTreeMap<String, PlanFile>,
    /// Account → the payment system's customer id, for exports (default: the account id).
    #[serde(default)]
    customers: BTreeMap<String, String>,
    /// Meter → Stripe meter `event_name` (default `tollgate_<meter>`).
    #[serde(default)]
    stripe_event_names: BTreeMap<Meter, String>,
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn default_currency() -> String {
    "USD".into()
}

fn default_billing_period() -> Period {
    Period::Month
}

/// One tier of a price: units up to `up_to` (inclusive; `None`: no end) cost `amount` per the
/// price's `per` units, plus `flat` once when reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub up_to: Option<u64>,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub flat: Decimal,
}

/// A checked price of one meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Price {
    /// The number of units each tier's `amount` is the price of.
    pub per: u64,
    pub mode: TierMode,
    /// At least one; only the last has no `up_to`.
    pub tiers: Vec<Tier>,
    /// The most this price charges per license and billing period.
    pub cap: Option<Decimal>,
}

/// A plan's fee and prices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanPricing {
    pub fee: Option<Decimal>,
    pub included: BTreeMap<Meter, u64>,
    pub prices: BTreeMap<Meter, Price>,
    /// Feature → meter → price, replacing the plan's price of that meter for the feature.
    pub feature_prices: BTreeMap<String, BTreeMap<Meter, Price>>,
    pub minimum: Option<Decimal>,
    /// Per distinct active user of a license and billing period.
    pub active_users: Option<Price>,
}

/// A checked catalogue.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub time_zone: Tz,
    pub currency: String,
    /// Invoices cover one calendar period of this length.
    pub billing_period: Period,
    pub plans: BTreeMap<String, PlanPricing>,
    /// (plan, meter, period) → limit.
    quotas: BTreeMap<(String, Meter, Period), u64>,
    customers: BTreeMap<String, String>,
    stripe_event_names: BTreeMap<Meter, String>,
}

impl Default for Catalog {
    /// UTC, USD, monthly, no prices (no spend accrues).
    fn default() -> Self {
        Catalog {
            time_zone: Tz::UTC,
            currency: default_currency(),
            billing_period: Period::Month,
            plans: BTreeMap::new(),
            quotas: BTreeMap::new(),
            customers: BTreeMap::new(),
            stripe_event_names: BTreeMap::new(),
        }
    }
}

fn non_negative(at: &str, value: Decimal) -> Result<Decimal> {
    if value.is_sign_negative() && !value.is_zero() {
        bail!("{at}: a price cannot be negative");
    }
    Ok(value)
}

fn compile_price(at: &str, spec: PriceSpec) -> Result<Price> {
    let object = match spec {
        PriceSpec::PerUnit(amount) => PriceObject {
            amount: Some(amount),
            per: None,
            tiers: None,
            mode: TierMode::Graduated,
            cap: None,
        },
        PriceSpec::Detailed(object) => object,
    };
    let per = object.per.unwrap_or(1);
    if per == 0 {
        bail!("{at}: `per` must be at least 1");
    }
    let tiers = match (object.amount, object.tiers) {
        (Some(amount), None) => vec![Tier {
            up_to: None,
            amount: non_negative(at, amount)?,
            flat: Decimal::ZERO,
        }],
        (None, Some(tiers)) => {
            if tiers.is_empty() {
                bail!("{at}.tiers: at least one tier is needed");
            }
            let mut checked = Vec::with_capacity(tiers.len());
            let mut last_up_to = 0u64;
            for (i, tier) in tiers.iter().enumerate() {
                let is_last = i + 1 == tiers.len();
                match (tier.up_to, is_last) {
                    (None, false) => bail!("{at}.tiers[{i}]: only the last tier may omit `up_to`"),
                    // Units above the last bound would have no price: free, or unratable.
                    (Some(_), true) => bail!(
                        "{at}.tiers[{i}]: the last tier has no `up_to` (it prices every unit above the others)"
                    ),
                    (Some(up_to), _) if up_to <= last_up_to && i > 0 => {
                        bail!("{at}.tiers[{i}].up_to: tiers must go up")
                    }
                    (Some(0), _) => bail!("{at}.tiers[{i}].up_to: must be at least 1"),
                    _ => {}
                }
                last_up_to = tier.up_to.unwrap_or(u64::MAX);
                checked.push(Tier {
                    up_to: tier.up_to,
                    amount: non_negative(&format!("{at}.tiers[{i}].amount"), tier.amount)?,
                    flat: non_negative(
                        &format!("{at}.tiers[{i}].flat"),
                        tier.flat.unwrap_or(Decimal::ZERO),
                    )?,
                });
            }
            checked
        }
        _ => bail!("{at}: give `amount` or `tiers`"),
    };
    let cap = object
        .cap
        .map(|c| non_negative(&format!("{at}.cap"), c))
        .transpose()?;
    Ok(Price {
        per,
        mode: object.mode,
        tiers,
        cap,
    })
}

fn compile_prices(at: &str, specs: BTreeMap<Meter, PriceSpec>) -> Result<BTreeMap<Meter, Price>> {
    specs
        .into_iter()
        .map(|(meter, spec)| {
            Ok((
                meter,
                compile_price(&format!("{at}.{}", meter.as_str()), spec)?,
            ))
        })
        .collect()
}

impl Catalog {
    pub fn from_json(text: &[u8]) -> Result<Catalog> {
        let file: CatalogFile = serde_json::from_slice(text).context("not a plan catalogue")?;
        let time_zone: Tz = file
            .time_zone
            .parse()
            .map_err(|_| anyhow::anyhow!("time_zone: unknown time zone `{}` (an IANA name such as `Europe/Berlin`, or `UTC`)", file.time_zone))?;
        if file.currency.len() != 3 || !file.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            bail!(
                "currency: `{}` is not an ISO 4217 code such as EUR",
                file.currency
            );
        }
        let mut plans = BTreeMap::new();
        let mut quotas = BTreeMap::new();
        for (plan, spec) in file.plans {
            for (meter, quota) in &spec.quotas {
                if quota.limit == 0 {
                    bail!(
                        "plans.{plan}.quotas.{}.limit: must be at least 1",
                        meter.as_str()
                    );
                }
                quotas.insert((plan.clone(), *meter, quota.per), quota.limit);
            }
            let (fee, included) = match spec.subscription {
                Some(s) => (
                    Some(non_negative(
                        &format!("plans.{plan}.subscription.fee"),
                        s.fee,
                    )?),
                    s.included,
                ),
                None => (None, BTreeMap::new()),
            };
            let prices = compile_prices(&format!("plans.{plan}.prices"), spec.prices)?;
            let active_users = spec
                .active_users
                .map(|p| compile_price(&format!("plans.{plan}.active_users"), p))
                .transpose()?;
            let mut feature_prices = BTreeMap::new();
            for (feature, f) in spec.features {
                feature_prices.insert(
                    feature.clone(),
                    compile_prices(&format!("plans.{plan}.features.{feature}.prices"), f.prices)?,
                );
            }
            let minimum = spec
                .minimum
                .map(|m| non_negative(&format!("plans.{plan}.minimum"), m))
                .transpose()?;
            plans.insert(
                plan,
                PlanPricing {
                    fee,
                    included,
                    prices,
                    feature_prices,
                    minimum,
                    active_users,
                },
            );
        }
        Ok(Catalog {
            time_zone,
            currency: file.currency,
            billing_period: file.billing_period,
            plans,
            quotas,
            customers: file.customers,
            stripe_event_names: file.stripe_event_names,
        })
    }

    /// The plans the catalogue names.
    pub fn plan_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.plans.keys().cloned().collect();
        for (plan, _, _) in self.quotas.keys() {
            if !names.contains(plan) {
                names.push(plan.clone());
            }
        }
        names.sort();
        names
    }

    /// The catalogue's limit for `plan`'s quota of `meter` per `period`, if it sets one: an
    /// operator's change of it applies to the next lease granted.
    pub fn quota_limit(&self, plan: &str, meter: Meter, period: Period) -> Option<u64> {
        self.quotas.get(&(plan.to_string(), meter, period)).copied()
    }

    /// The quota limits the catalogue sets for `plan`: (meter, period, limit).
    pub fn plan_quotas(&self, plan: &str) -> Vec<(Meter, Period, u64)> {
        self.quotas
            .iter()
            .filter(|((p, _, _), _)| p == plan)
            .map(|((_, meter, period), limit)| (*meter, *period, *limit))
            .collect()
    }

    /// The calendar period containing `now_ms`, `[start, end)` in Unix milliseconds.
    pub fn period_bounds(&self, period: Period, now_ms: u64) -> (u64, u64) {
        period_bounds(self.time_zone, period, now_ms)
    }

    /// The payment system's customer id of `account`.
    pub fn customer_of<'a>(&'a self, account: &'a str) -> &'a str {
        self.customers.get(account).map_or(account, String::as_str)
    }

    /// The Stripe meter event name of `meter`.
    pub fn stripe_event_name(&self, meter: Meter) -> String {
        self.stripe_event_names
            .get(&meter)
            .cloned()
            .unwrap_or_else(|| format!("tollgate_{}", meter.as_str()))
    }
}

/// The calendar period of `tz` containing `now_ms`. Local midnight or the local first of the
/// month may not exist or exist twice on a daylight-saving change; the earliest instant at or
/// after it is taken.
pub fn period_bounds(tz: Tz, period: Period, now_ms: u64) -> (u64, u64) {
    let now_ms_i = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let Some(now) = DateTime::from_timestamp_millis(now_ms_i).map(|t| t.with_timezone(&tz)) else {
        return (now_ms, now_ms.saturating_add(1));
    };
    let date = now.date_naive();
    let (start, end) = match period {
        Period::Hour => {
            // Local hours, on the UTC timeline: the offset in force now decides where the
            // hour starts (a zone 30 or 45 minutes off UTC moves the boundary). Computed from
            // the offset, not by setting the local minute to 0: in the hour repeated when the
            // clocks go back, that local time is ambiguous and has no single answer.
            let offset_ms = i64::from(now.offset().fix().local_minus_utc()) * 1000;
            let start = now_ms_i - (now_ms_i + offset_ms).rem_euclid(3_600_000);
            (start, start.saturating_add(3_600_000))
        }
        Period::Day => (
            local_midnight(tz, date),
            local_midnight(tz, date.succ_opt().unwrap_or(date)),
        ),
        Period::Month => {
            let first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
            let next = if date.month() == 12 {
                NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
            }
            .unwrap_or(date);
            (local_midnight(tz, first), local_midnight(tz, next))
        }
    };
    let as_u64 = |ms: i64| u64::try_from(ms).unwrap_or(0);
    (
        as_u64(start),
        as_u64(end).max(as_u64(start).saturating_add(1)),
    )
}

/// The first instant of `date` in `tz`, Unix milliseconds.
fn local_midnight(tz: Tz, date: NaiveDate) -> i64 {
    let Some(midnight) = date.and_hms_opt(0, 0, 0) else {
        return 0;
    };
    // A day may start at 01:00 when the clocks go forward at midnight: try the next minutes.
    for minutes in 0..=180 {
        let local = midnight + chrono::Duration::minutes(minutes);
        if let Some(t) = tz.from_local_datetime(&local).earliest() {
            return t.timestamp_millis();
        }
    }
    tz.from_utc_datetime(&midnight).timestamp_millis()
}

/// A catalogue file, read again when its modification time changes.
pub struct CatalogFileWatch {
    path: Option<PathBuf>,
    state: Mutex<(Option<SystemTime>, std::sync::Arc<Catalog>)>,
}

impl CatalogFileWatch {
    /// The default catalogue (UTC, USD, no prices), no file.
    pub fn empty() -> CatalogFileWatch {
        CatalogFileWatch {
            path: None,
            state: Mutex::new((None, std::sync::Arc::new(Catalog::default()))),
        }
    }

    /// `None`: the default catalogue (UTC, no prices).
    pub fn open(path: Option<&Path>) -> Result<CatalogFileWatch> {
        let watch = CatalogFileWatch {
            path: path.map(Path::to_path_buf),
            state: Mutex::new((None, std::sync::Arc::new(Catalog::default()))),
        };
        if let Some(path) = path {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let catalog =
                Catalog::from_json(&text).with_context(|| format!("in {}", path.display()))?;
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if let Ok(mut state) = watch.state.lock() {
                *state = (modified, std::sync::Arc::new(catalog));
            }
        }
        Ok(watch)
    }

    /// The current catalogue. A changed file is read again; if it is invalid now, the last
    /// good catalogue stays and the error is logged once per change.
    pub fn current(&self) -> std::sync::Arc<Catalog> {
        let Ok(mut state) = self.state.lock() else {
            return std::sync::Arc::new(Catalog::default());
        };
        if let Some(path) = &self.path {
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if modified.is_some() && modified != state.0 {
                state.0 = modified;
                match std::fs::read(path)
                    .map_err(anyhow::Error::from)
                    .and_then(|text| Catalog::from_json(&text))
                {
                    Ok(catalog) => {
                        state.1 = std::sync::Arc::new(catalog);
                        tracing::info!(path = %path.display(), "plan catalogue reloaded");
                    }
                    Err(e) => tracing::error!(
                        path = %path.display(),
                        error = %format!("{e:#}"),
                        "plan catalogue not reloaded; keeping the last good one"
                    ),
                }
            }
        }
        std::sync::Arc::clone(&state.1)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ms(text: &str) -> u64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn utc_periods() {
        let now = ms("2026-06-15T10:42:13Z");
        let utc = Tz::UTC;
        assert_eq!(
            period_bounds(utc, Period::Hour, now),
            (ms("2026-06-15T10:00:00Z"), ms("2026-06-15T11:00:00Z"))
        );
        assert_eq!(
            period_bounds(utc, Period::Day, now),
            (ms("2026-06-15T00:00:00Z"), ms("2026-06-16T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(utc, Period::Month, now),
            (ms("2026-06-01T00:00:00Z"), ms("2026-07-01T00:00:00Z"))
        );
        // December rolls over the year; a boundary instant belongs to the new period.
        assert_eq!(
            period_bounds(utc, Period::Month, ms("2026-12-31T23:59:59Z")),
            (ms("2026-12-01T00:00:00Z"), ms("2027-01-01T00:00:00Z"))
        );
        assert_eq!(
            period_bounds(utc, Period::Day, ms("2026-06-16T00:00:00Z")).0,
            ms("2026-06-16T00:00:00Z")
        );
    }

    #[test]
    fn periods_in_a_time_zone_follow_its_calendar_and_daylight_saving() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // 23:30 UTC on 30 June is already 1 July in Berlin (UTC+2).
        let now = ms("2026-06-30T23:30:00Z");
        assert_eq!(
            period_bounds(berlin, Period::Month, now),
            (ms("2026-06-30T22:00:00Z"), ms("2026-07-31T22:00:00Z"))
        );
        // The day the clocks go forward (29 March 2026) lasts 23 hours.
        let (start, end) = period_bounds(berlin, Period::Day, ms("2026-03-29T12:00:00Z"));
        assert_eq!(
            (start, end),
            (ms("2026-03-28T23:00:00Z"), ms("2026-03-29T22:00:00Z"))
        );
        // The hour repeated when the clocks go back (25 October 2026, 02:00-03:00 local twice):
        // each occurrence is an hour of its own, not a period starting at every request.
        assert_eq!(
            period_bounds(berlin, Period::Hour, ms("2026-10-25T00:42:00Z")),
            (ms("2026-10-25T00:00:00Z"), ms("2026-10-25T01:00:00Z"))
        );
        assert_eq!(
            period_bounds(berlin, Period::Hour, ms("2026-10-25T01:42:00Z")),
            (ms("2026-10-25T01:00:00Z"), ms("2026-10-25T02:00:00Z"))
        );
        // India is UTC+05:30: its hours start at :30 UTC.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        assert_eq!(
            period_bounds(kolkata, Period::Hour, ms("2026-06-15T10:42:00Z")),
            (ms("2026-06-15T10:30:00Z"), ms("2026-06-15T11:30:00Z"))
        );
        // Clocks going forward at midnight (Santiago, 6 September 2026): the day starts at 01:00.
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let (start, _) = period_bounds(santiago, Period::Day, ms("2026-09-06T15:00:00Z"));
        assert_eq!(start, ms("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn prices_tiers_and_fees_are_checked() {
        let c = Catalog::from_json(
            br#"{"time_zone": "Europe/Berlin", "currency": "EUR", "plans": {"pro": {
                "subscription": {"fee": "49", "included": {"calls": 1000}},
                "prices": {"calls": "0.001",
                           "response_bytes": {"tiers": [{"up_to": 1000, "amount": "0.09"}, {"amount": "0.05", "flat": "1"}], "per": 1000000000, "mode": "volume", "cap": "100"}},
                "features": {"design": {"prices": {"processing_ns": {"amount": "15", "per": 3600000000000}}}},
                "minimum": "10"}}}"#,
        )
        .unwrap();
        let pro = &c.plans["pro"];
        assert_eq!(pro.fee, Some(Decimal::from(49)));
        assert_eq!(pro.included[&Meter::Calls], 1000);
        assert_eq!(
            pro.prices[&Meter::Calls].tiers[0].amount,
            Decimal::new(1, 3)
        );
        let bytes = &pro.prices[&Meter::ResponseBytes];
        assert_eq!(
            (bytes.per, bytes.mode, bytes.tiers.len()),
            (1_000_000_000, TierMode::Volume, 2)
        );
        assert_eq!(bytes.tiers[1].flat, Decimal::ONE);
        assert_eq!(
            pro.feature_prices["design"][&Meter::ProcessingNs].per,
            3_600_000_000_000
        );
        assert_eq!(c.plan_names(), vec!["pro".to_string()]);
        let q = Catalog::from_json(
            br#"{"plans": {"pro": {"quotas": {"calls": {"per": "day", "limit": 500}}}}}"#,
        )
        .unwrap();
        assert_eq!(q.quota_limit("pro", Meter::Calls, Period::Day), Some(500));
        assert_eq!(q.quota_limit("pro", Meter::Calls, Period::Month), None);
        assert_eq!(q.quota_limit("free", Meter::Calls, Period::Day), None);
        for (bad, says) in [
            (r#"{"time_zone": "Mars/Olympus"}"#, "unknown time zone"),
            (r#"{"currency": "euro"}"#, "ISO 4217"),
            (
                r#"{"plans": {"p": {"prices": {"calls": "-1"}}}}"#,
                "negative",
            ),
            (
                r#"{"plans": {"p": {"prices": {"calls": {"amount": "1", "per": 0}}}}}"#,
                "at least 1",
            ),
            (
                r#"{"plans": {"p": {"prices": {"calls": {"per": 5}}}}}"#,
                "`amount` or `tiers`",
            ),
            (
                r#"{"plans": {"p": {"prices": {"calls": {"tiers": [{"amount": "1"}, {"up_to": 5, "amount": "1"}]}}}}}"#,
                "only the last tier",
            ),
            (
                r#"{"plans": {"p": {"prices": {"calls": {"tiers": [{"up_to": 5, "amount": "1"}, {"up_to": 5, "amount": "1"}, {"amount": "1"}]}}}}}"#,
                "must go up",
            ),
            (
                r#"{"plans": {"p": {"prices": {"calls": {"tiers": [{"up_to": 5, "amount": "1"}, {"up_to": 9, "amount": "1"}]}}}}}"#,
                "the last tier has no `up_to`",
            ),
            (
                r#"{"plans": {"p": {"subscription": {"fee": "-3"}}}}"#,
                "negative",
            ),
            (
                r#"{"plans": {"p": {"prices": {"clicks": "1"}}}}"#,
                "plan catalogue",
            ),
            (r#"{"bogus": 1}"#, "plan catalogue"),
        ] {
            let e = format!("{:#}", Catalog::from_json(bad.as_bytes()).unwrap_err());
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
