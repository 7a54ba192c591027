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
use serde::Deserialize;
use tollgate_wire::sync::Period;
use tollgate_wire::Meter;

/// A price: `amount` of the currency per `per` units of a meter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum PriceSpec {
    PerUnit(Decimal),
    Per { amount: Decimal, per: u64 },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    prices: BTreeMap<Meter, PriceSpec>,
    /// Quota limits that override the filters' configuration for this plan.
    #[serde(default)]
    quotas: BTreeMap<Meter, QuotaSpec>,
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
    #[serde(default)]
    plans: BTreeMap<String, PlanFile>,
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn default_currency() -> String {
    "USD".into()
}

/// A checked catalogue.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub time_zone: Tz,
    pub currency: String,
    /// Plan → meter → price of one unit.
    prices: BTreeMap<String, BTreeMap<Meter, Decimal>>,
    /// (plan, meter, period) → limit.
    quotas: BTreeMap<(String, Meter, Period), u64>,
}

impl Default for Catalog {
    /// UTC, USD, no prices (no spend accrues).
    fn default() -> Self {
        Catalog {
            time_zone: Tz::UTC,
            currency: default_currency(),
            prices: BTreeMap::new(),
            quotas: BTreeMap::new(),
        }
    }
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
        let mut prices = BTreeMap::new();
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
            let mut per_meter = BTreeMap::new();
            for (meter, price) in spec.prices {
                let unit = match price {
                    PriceSpec::PerUnit(amount) => amount,
                    PriceSpec::Per { amount, per } => {
                        if per == 0 {
                            bail!(
                                "plans.{plan}.prices.{}: `per` must be at least 1",
                                meter.as_str()
                            );
                        }
                        amount / Decimal::from(per)
                    }
                };
                if unit.is_sign_negative() {
                    bail!(
                        "plans.{plan}.prices.{}: a price cannot be negative",
                        meter.as_str()
                    );
                }
                per_meter.insert(meter, unit);
            }
            prices.insert(plan, per_meter);
        }
        Ok(Catalog {
            time_zone,
            currency: file.currency,
            prices,
            quotas,
        })
    }

    /// The price of one unit of `meter` in `plan` (zero if the plan or meter has none).
    pub fn unit_price(&self, plan: &str, meter: Meter) -> Decimal {
        self.prices
            .get(plan)
            .and_then(|p| p.get(&meter))
            .copied()
            .unwrap_or(Decimal::ZERO)
    }

    /// The catalogue's limit for `plan`'s quota of `meter` per `period`, if it sets one: an
    /// operator's change of it applies to the next lease granted.
    pub fn quota_limit(&self, plan: &str, meter: Meter, period: Period) -> Option<u64> {
        self.quotas.get(&(plan.to_string(), meter, period)).copied()
    }

    /// The calendar period containing `now_ms`, `[start, end)` in Unix milliseconds.
    pub fn period_bounds(&self, period: Period, now_ms: u64) -> (u64, u64) {
        period_bounds(self.time_zone, period, now_ms)
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
                        eprintln!(
                            "{}",
                            serde_json::json!({"level": "info", "msg": "plan catalogue reloaded", "path": path.display().to_string()})
                        );
                    }
                    Err(e) => eprintln!(
                        "{}",
                        serde_json::json!({"level": "error", "msg": "plan catalogue not reloaded; keeping the last good one", "path": path.display().to_string(), "error": format!("{e:#}")})
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
    fn prices_are_decimal_per_unit_and_the_file_is_checked() {
        let c = Catalog::from_json(
            br#"{"time_zone": "Europe/Berlin", "currency": "EUR", "plans": {"pro": {"prices": {
                "calls": "0.001", "processing_ns": {"amount": "15", "per": 3600000000000}}}}}"#,
        )
        .unwrap();
        assert_eq!(c.unit_price("pro", Meter::Calls), Decimal::new(1, 3));
        // $15 per hour of processing time: one hour of nanoseconds costs exactly 15.
        let hour = Decimal::from(3_600_000_000_000u64);
        assert_eq!(
            (c.unit_price("pro", Meter::ProcessingNs) * hour).round_dp(10),
            Decimal::from(15)
        );
        assert_eq!(c.unit_price("pro", Meter::ResponseBytes), Decimal::ZERO);
        assert_eq!(c.unit_price("free", Meter::Calls), Decimal::ZERO);
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
