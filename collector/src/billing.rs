//! Rating: stored usage and the price catalogue in, an invoice out. Pure and deterministic:
//! the same usage and catalogue always give the same invoice, to the cent.
//!
//! Per license of the account, for the billing period:
//! - the plan's subscription fee, once (no proration);
//! - per meter, the license's allowed usage: features with a price of their own for the meter
//!   are rated apart; the rest is rated with the plan's price, after the subscription's included
//!   units are taken off;
//! - each price rates its quantity by tiers (`graduated`: every unit at its tier's price, one
//!   line per tier reached; `volume`: all units at the price of the tier the total reaches),
//!   then its `cap` limits the charge;
//! - the plan's `minimum` tops the license's total up.
//!
//! Amounts are computed exactly in decimal and each line is rounded once, half away from zero,
//! to the currency's minor unit; the total is the sum of the rounded lines.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;
use tollgate_wire::Meter;

use crate::catalog::{Catalog, PlanPricing, Price, TierMode};
use crate::storage::{BillableUsage, IssuedLicense};

/// Digits after the decimal point of an ISO 4217 currency's minor unit.
pub fn minor_units(currency: &str) -> u32 {
    const ZERO: &[&str] = &[
        "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
        "VUV", "XAF", "XOF", "XPF",
    ];
    const THREE: &[&str] = &["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"];
    if ZERO.contains(&currency) {
        0
    } else if THREE.contains(&currency) {
        3
    } else {
        2
    }
}

/// What a line charges for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The plan's fee for the period.
    Subscription,
    /// Usage of a meter within one tier of its price.
    Usage,
    /// A price's cap, taking back what it would charge above the cap.
    Cap,
    /// Topping a license up to its plan's minimum.
    Minimum,
    /// Distinct active end users of a license in the period, within one tier of the price.
    ActiveUsers,
}

/// One line of an invoice: `quantity` units at `unit_price` per `per` units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    pub kind: LineKind,
    pub license: String,
    pub plan: String,
    /// The feature a price of its own applies to; absent for the plan's price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    /// For usage lines, the tier (from 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<usize>,
    /// Usage of earlier periods that arrived after their invoice was cut.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
    pub description: String,
    pub quantity: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    pub per: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// Usage the catalogue has no price for (a plan it does not list, or a license whose plan is
/// unknown): not charged, listed so that finance sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unpriced {
    pub license: String,
    pub plan: String,
    pub feature: String,
    pub meter: String,
    pub units: u64,
}

/// An invoice for one account and billing period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    /// Stable: the account and the period's start, in the catalogue's time zone as the period
    /// is (`acme/2026-11-01T00:00:00+01:00`).
    pub invoice_id: String,
    pub account: String,
    pub currency: String,
    pub period_start: String,
    pub period_end: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    pub lines: Vec<Line>,
    pub unpriced: Vec<Unpriced>,
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
}

impl Invoice {
    /// The lines as CSV (RFC 4180), with a header row.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "invoice_id,account,currency,period_start,period_end,kind,license,plan,feature,meter,tier,description,quantity,unit_price,per,amount\n",
        );
        for l in &self.lines {
            let kind = match l.kind {
                LineKind::Subscription => "subscription",
                LineKind::Usage => "usage",
                LineKind::Cap => "cap",
                LineKind::Minimum => "minimum",
                LineKind::ActiveUsers => "active_users",
            };
            let fields = [
                self.invoice_id.clone(),
                self.account.clone(),
                self.currency.clone(),
                self.period_start.clone(),
                self.period_end.clone(),
                kind.to_string(),
                l.license.clone(),
                l.plan.clone(),
                l.feature.clone().unwrap_or_default(),
                l.meter.clone().unwrap_or_default(),
                l.tier.map(|t| t.to_string()).unwrap_or_default(),
                l.description.clone(),
                l.quantity.to_string(),
                l.unit_price.to_string(),
                l.per.to_string(),
                l.amount.to_string(),
            ];
            let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&row.join(","));
            out.push('\n');
        }
        out
    }
}

/// A CSV field, quoted when it must be. A leading `=`, `+`, `-` or `@` is prefixed with `'`
/// unless the field is a number, so that a spreadsheet does not run account names as formulas.
pub fn csv_field(value: &str) -> String {
    let numeric = value.parse::<Decimal>().is_ok();
    let value = if !numeric && value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

fn meter_named(name: &str) -> Option<Meter> {
    Meter::ALL.into_iter().find(|m| m.as_str() == name)
}

/// `ms` as RFC 3339 in `tz`.
pub(crate) fn rfc3339(tz: chrono_tz::Tz, ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.with_timezone(&tz).to_rfc3339())
        .unwrap_or_default()
}

/// An invoice's id names its period's start as its period does: in the catalogue's zone.
fn invoice_id(tz: chrono_tz::Tz, account: &str, start_ms: u64) -> String {
    let start =
        chrono::DateTime::from_timestamp_millis(i64::try_from(start_ms).unwrap_or(i64::MAX))
            .map(|t| {
                t.with_timezone(&tz)
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
            .unwrap_or_default();
    format!("{account}/{start}")
}

fn utc(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// What the rater needs about one license.
#[derive(Debug, Clone, Default)]
struct LicenseUsage {
    plan: String,
    /// (feature, meter) → units of the period.
    units: BTreeMap<(String, Meter), u64>,
    /// (feature, meter) → late units: usage of earlier periods that arrived after their
    /// invoice was cut.
    late: BTreeMap<(String, Meter), u64>,
    /// Pays the plan's fee: issued and valid during the period, or used in it; not revoked
    /// before the period began.
    pays_fee: bool,
}

/// Rate `account`'s usage of the billing period `[start_ms, end_ms)`.
///
/// - `usage`: allowed usage with windows in the period;
/// - `late`: allowed usage of earlier periods that arrived after their invoice was cut (see
///   [`late_usage_bounds`]): rated on its own lines, with the plan's prices, without included
///   units, fees or minimums (those belonged to its period);
/// - `licenses`: the account's issued licenses: those valid during the period pay their plan's
///   fee even without usage, unless revoked before it began.
pub fn rate(
    catalog: &Catalog,
    account: &str,
    bounds: (u64, u64),
    usage: &[BillableUsage],
    late: &[BillableUsage],
    licenses: &[IssuedLicense],
) -> Result<Invoice> {
    rate_with_users(
        catalog,
        account,
        bounds,
        usage,
        late,
        licenses,
        &BTreeMap::new(),
    )
}

/// [`rate`], with the distinct active users of each license in the period (license → users),
/// charged at the plan's `active_users` price.
pub fn rate_with_users(
    catalog: &Catalog,
    account: &str,
    (start_ms, end_ms): (u64, u64),
    usage: &[BillableUsage],
    late: &[BillableUsage],
    licenses: &[IssuedLicense],
    active_users: &BTreeMap<String, u64>,
) -> Result<Invoice> {
    let digits = minor_units(&catalog.currency);
    // Every amount has exactly the currency's minor digits: 49 is shown as 49.00.
    let round = |d: Decimal| {
        let mut rounded = d.round_dp_with_strategy(digits, RoundingStrategy::MidpointAwayFromZero);
        rounded.rescale(digits);
        rounded
    };
    let revoked_before: std::collections::BTreeSet<&str> = licenses
        .iter()
        .filter(|l| l.revoked_ms.is_some_and(|r| r < start_ms))
        .map(|l| l.license.as_str())
        .collect();
    let mut by_license: BTreeMap<String, LicenseUsage> = BTreeMap::new();
    for l in licenses {
        if l.account == account && l.not_before_ms < end_ms && l.expires_ms > start_ms {
            let entry = by_license.entry(l.license.clone()).or_default();
            entry.plan = l.plan.clone();
            entry.pays_fee = !revoked_before.contains(l.license.as_str());
        }
    }
    for license in active_users.keys() {
        // A license with users has allowed calls in the period: its usage rows name its plan.
        by_license.entry(license.clone()).or_default();
    }
    let mut unpriced = Vec::new();
    for (rows, is_late) in [(usage, false), (late, true)] {
        for row in rows {
            let entry = by_license.entry(row.license.clone()).or_default();
            if entry.plan.is_empty() {
                entry.plan = row.plan.clone();
            }
            if !is_late && !revoked_before.contains(row.license.as_str()) {
                entry.pays_fee = true;
            }
            let Some(meter) = meter_named(&row.meter) else {
                continue;
            };
            if !catalog.plans.contains_key(&row.plan) {
                unpriced.push(Unpriced {
                    license: row.license.clone(),
                    plan: row.plan.clone(),
                    feature: row.feature.clone(),
                    meter: row.meter.clone(),
                    units: row.units,
                });
                continue;
            }
            let map = if is_late {
                &mut entry.late
            } else {
                &mut entry.units
            };
            let units = map.entry((row.feature.clone(), meter)).or_insert(0);
            *units = units.saturating_add(row.units);
        }
    }

    let mut lines = Vec::new();
    for (license, usage) in &by_license {
        let Some(pricing) = catalog.plans.get(&usage.plan) else {
            continue;
        };
        let first_line = lines.len();
        if usage.pays_fee {
            if let Some(fee) = pricing.fee {
                lines.push(Line {
                    kind: LineKind::Subscription,
                    license: license.clone(),
                    plan: usage.plan.clone(),
                    feature: None,
                    meter: None,
                    tier: None,
                    late: false,
                    description: format!("subscription to plan {}", usage.plan),
                    quantity: 1,
                    unit_price: round(fee),
                    per: 1,
                    amount: round(fee),
                });
            }
        }
        rate_usage(
            license,
            &usage.plan,
            pricing,
            &usage.units,
            false,
            &round,
            &mut lines,
        )?;
        if let (Some(price), Some(users)) = (&pricing.active_users, active_users.get(license)) {
            rate_price(
                license,
                &usage.plan,
                None,
                "active_users",
                LineKind::ActiveUsers,
                "distinct active users",
                *users,
                price,
                &round,
                &mut lines,
            )?;
        }
        let subtotal: Decimal = lines[first_line..].iter().map(|l| l.amount).sum();
        if let Some(minimum) = pricing.minimum.filter(|_| usage.pays_fee) {
            if subtotal < minimum {
                lines.push(Line {
                    kind: LineKind::Minimum,
                    license: license.clone(),
                    plan: usage.plan.clone(),
                    feature: None,
                    meter: None,
                    tier: None,
                    late: false,
                    description: format!("minimum charge of plan {}", usage.plan),
                    quantity: 1,
                    unit_price: round(minimum - subtotal),
                    per: 1,
                    amount: round(minimum - subtotal),
                });
            }
        }
        rate_usage(
            license,
            &usage.plan,
            pricing,
            &usage.late,
            true,
            &round,
            &mut lines,
        )?;
    }
    let total = round(lines.iter().map(|l| l.amount).sum());
    Ok(Invoice {
        invoice_id: invoice_id(catalog.time_zone, account, start_ms),
        account: account.to_string(),
        currency: catalog.currency.clone(),
        period_start: rfc3339(catalog.time_zone, start_ms),
        period_end: rfc3339(catalog.time_zone, end_ms),
        period_start_ms: start_ms,
        period_end_ms: end_ms,
        lines,
        unpriced,
        total,
    })
}

/// The usage lines of one license: per meter, the plan's price after included units (not for
/// late usage), and features with prices of their own apart.
fn rate_usage(
    license: &str,
    plan: &str,
    pricing: &PlanPricing,
    units: &BTreeMap<(String, Meter), u64>,
    late: bool,
    round: &dyn Fn(Decimal) -> Decimal,
    lines: &mut Vec<Line>,
) -> Result<()> {
    let mut plan_priced: BTreeMap<Meter, u64> = BTreeMap::new();
    let mut feature_priced: BTreeMap<(String, Meter), u64> = BTreeMap::new();
    for ((feature, meter), n) in units {
        if pricing
            .feature_prices
            .get(feature)
            .is_some_and(|p| p.contains_key(meter))
        {
            let units = feature_priced.entry((feature.clone(), *meter)).or_insert(0);
            *units = units.saturating_add(*n);
        } else {
            let units = plan_priced.entry(*meter).or_insert(0);
            *units = units.saturating_add(*n);
        }
    }
    let prefix = if late {
        "late usage of earlier periods: "
    } else {
        ""
    };
    let first = lines.len();
    for (meter, quantity) in plan_priced {
        let Some(price) = pricing.prices.get(&meter) else {
            continue;
        };
        let included = if late {
            0
        } else {
            pricing.included.get(&meter).copied().unwrap_or(0)
        };
        let billable = quantity.saturating_sub(included);
        let what = if included > 0 {
            format!("{} ({quantity} used, {included} included)", meter.as_str())
        } else {
            format!("{prefix}{}", meter.as_str())
        };
        rate_price(
            license,
            plan,
            None,
            meter.as_str(),
            LineKind::Usage,
            &what,
            billable,
            price,
            round,
            lines,
        )?;
    }
    for ((feature, meter), quantity) in feature_priced {
        let Some(price) = pricing
            .feature_prices
            .get(&feature)
            .and_then(|p| p.get(&meter))
        else {
            continue;
        };
        let what = format!("{prefix}{} of feature {feature}", meter.as_str());
        rate_price(
            license,
            plan,
            Some(&feature),
            meter.as_str(),
            LineKind::Usage,
            &what,
            quantity,
            price,
            round,
            lines,
        )?;
    }
    for line in lines.iter_mut().skip(first) {
        line.late = late;
    }
    Ok(())
}

/// `quantity × amount / per`, exact until the final division.
fn charge(quantity: u64, amount: Decimal, per: u64) -> Result<Decimal> {
    Decimal::from(quantity)
        .checked_mul(amount)
        .and_then(|d| d.checked_div(Decimal::from(per)))
        .context("an amount is too large to compute")
}

#[allow(clippy::too_many_arguments)]
fn rate_price(
    license: &str,
    plan: &str,
    feature: Option<&str>,
    meter: &str,
    kind: LineKind,
    what: &str,
    quantity: u64,
    price: &Price,
    round: &dyn Fn(Decimal) -> Decimal,
    lines: &mut Vec<Line>,
) -> Result<()> {
    if quantity == 0 {
        return Ok(());
    }
    let line = |tier: usize, n: u64, amount: Decimal, charged: Decimal| Line {
        kind,
        license: license.to_string(),
        plan: plan.to_string(),
        feature: feature.map(str::to_string),
        meter: Some(meter.to_string()),
        tier: (price.tiers.len() > 1).then_some(tier + 1),
        late: false,
        description: if price.tiers.len() > 1 {
            format!("{what}, tier {}", tier + 1)
        } else {
            what.to_string()
        },
        quantity: n,
        unit_price: amount,
        per: price.per,
        amount: round(charged),
    };
    let first = lines.len();
    match price.mode {
        TierMode::Graduated => {
            let mut below = 0u64;
            let last = price.tiers.len().saturating_sub(1);
            for (i, tier) in price.tiers.iter().enumerate() {
                if quantity <= below {
                    break;
                }
                // The last tier is open-ended (the catalogue checks it has no bound).
                let bound = if i == last { None } else { tier.up_to };
                let top = bound.unwrap_or(u64::MAX).min(quantity);
                let n = top - below;
                let charged = charge(n, tier.amount, price.per)? + tier.flat;
                lines.push(line(i, n, tier.amount, charged));
                below = top;
            }
        }
        TierMode::Volume => {
            let last = price.tiers.len().saturating_sub(1);
            let (i, tier) = price
                .tiers
                .iter()
                .enumerate()
                .find(|(i, t)| *i == last || t.up_to.is_none_or(|up| quantity <= up))
                .context("a price has no tier")?;
            let charged = charge(quantity, tier.amount, price.per)? + tier.flat;
            lines.push(line(i, quantity, tier.amount, charged));
        }
    }
    if let Some(cap) = price.cap {
        let charged: Decimal = lines[first..].iter().map(|l| l.amount).sum();
        let cap = round(cap);
        if charged > cap {
            lines.push(Line {
                kind: LineKind::Cap,
                license: license.to_string(),
                plan: plan.to_string(),
                feature: feature.map(str::to_string),
                meter: Some(meter.to_string()),
                tier: None,
                late: false,
                description: format!("{what}: capped at {cap}"),
                quantity: 1,
                unit_price: cap - charged,
                per: 1,
                amount: cap - charged,
            });
        }
    }
    Ok(())
}

/// The period's end forecast from its usage so far: each license's usage of each meter grows
/// at the average rate of the elapsed part of the period, and is rated like the invoice. Fees
/// and minimums are already certain; distinct active users are taken as they are so far (a
/// user count does not grow with time the way calls do). Licenses in `stopped` (revoked, or
/// of a suspended account) are refused every request: their usage stays as it is, so their
/// charges are forecast at what they are so far. `None` before any of the period has elapsed.
#[allow(clippy::too_many_arguments)]
pub fn forecast(
    catalog: &Catalog,
    account: &str,
    bounds: (u64, u64),
    usage: &[BillableUsage],
    late: &[BillableUsage],
    licenses: &[IssuedLicense],
    active_users: &BTreeMap<String, u64>,
    stopped: &std::collections::BTreeSet<String>,
    now_ms: u64,
) -> Result<Option<Invoice>> {
    let (start, end) = bounds;
    let elapsed = now_ms.clamp(start, end) - start;
    if elapsed == 0 {
        return Ok(None);
    }
    let length = end - start;
    let scaled: Vec<BillableUsage> = usage
        .iter()
        .map(|u| BillableUsage {
            units: if stopped.contains(&u.license) {
                u.units
            } else {
                u64::try_from(u128::from(u.units) * u128::from(length) / u128::from(elapsed))
                    .unwrap_or(u64::MAX)
            },
            ..u.clone()
        })
        .collect();
    rate_with_users(
        catalog,
        account,
        bounds,
        &scaled,
        late,
        licenses,
        active_users,
    )
    .map(Some)
}

/// An invoice draft as the API shows it: the invoice so far, whether its period has ended,
/// and the forecast of its total at the period's end.
#[derive(Debug, Clone, Serialize)]
pub struct Draft {
    #[serde(flatten)]
    pub invoice: Invoice,
    /// `draft` while the period runs; `complete` once it has ended (usage still arriving late
    /// from filters that were cut off is added until the invoice is finalised).
    pub status: &'static str,
    pub as_of_ms: u64,
    /// The forecast total at the period's end (see [`forecast`]); absent once it ended.
    #[serde(
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub forecast_total: Option<Decimal>,
    /// Licenses refused every request now (revoked, or the account suspended): the forecast
    /// does not extrapolate their usage.
    pub not_forecast: Vec<Stopped>,
    /// Each line of `lines` in human units (hours, GB), in the same order.
    pub display: Vec<LineDisplay>,
}

/// A license whose usage is not forecast, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stopped {
    pub license: String,
    /// `revoked` or `suspended` (the account).
    pub standing: &'static str,
    pub reason: String,
}

/// The unit a meter's usage is shown in: `scale` meter units make one `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HumanUnit {
    /// Plural, as in "3 hours".
    pub unit: &'static str,
    /// Singular, as in "per hour".
    pub one: &'static str,
    pub scale: u64,
}

/// How people count `meter`: calls, GB (10^9 bytes), hours of processing.
pub fn human_unit(meter: Meter) -> HumanUnit {
    match meter {
        Meter::Calls => HumanUnit {
            unit: "calls",
            one: "call",
            scale: 1,
        },
        Meter::RequestBytes | Meter::ResponseBytes => HumanUnit {
            unit: "GB",
            one: "GB",
            scale: 1_000_000_000,
        },
        Meter::ProcessingNs => HumanUnit {
            unit: "hours",
            one: "hour",
            scale: 3_600_000_000_000,
        },
    }
}

/// One invoice line as people read it: the quantity in human units and the unit price per
/// `per` of them ("1.5 hours at 15 per hour", "2,000 calls at 1 per 1,000 calls").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineDisplay {
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Empty for lines that are not usage (a fee, a minimum, a cap).
    pub unit: &'static str,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// What `unit_price` is the price of: "hour", "GB", "call", "1000 calls", "user".
    pub per: String,
}

/// `line` in human units. The unit price is the line's, converted exactly; nothing is rated
/// again.
pub fn line_display(line: &Line) -> LineDisplay {
    let human = line.meter.as_deref().and_then(meter_named).map(human_unit);
    match (line.kind, human) {
        (LineKind::Usage, Some(h)) if h.scale > 1 => {
            let scale = Decimal::from(h.scale);
            let quantity = (Decimal::from(line.quantity) / scale)
                .round_dp(3)
                .normalize();
            let unit_price = line
                .unit_price
                .checked_mul(scale)
                .and_then(|p| p.checked_div(Decimal::from(line.per.max(1))))
                .map_or(line.unit_price, |p| p.round_dp(6).normalize());
            LineDisplay {
                quantity,
                unit: h.unit,
                unit_price,
                per: h.one.to_string(),
            }
        }
        (LineKind::Usage | LineKind::ActiveUsers, _) => {
            let (unit, one) = match (line.kind, human) {
                (LineKind::ActiveUsers, _) => ("users", "user"),
                (_, Some(h)) => (h.unit, h.one),
                _ => ("units", "unit"),
            };
            LineDisplay {
                quantity: Decimal::from(line.quantity),
                unit,
                unit_price: line.unit_price,
                per: if line.per == 1 {
                    one.to_string()
                } else {
                    format!("{} {unit}", line.per)
                },
            }
        }
        _ => LineDisplay {
            quantity: Decimal::from(line.quantity),
            unit: "",
            unit_price: line.unit_price,
            per: String::new(),
        },
    }
}

/// Usage received within this long before an invoice is finalised is billed by the next
/// invoice, as late usage: a batch still being stored while the invoice is finalised, or
/// stamped by a replica whose clock is a little behind, is never missed.
pub const SETTLE_MS: u64 = 60_000;

/// An invoice's period must be finalised after the periods before it that have usage.
#[derive(Debug)]
pub struct FinalizeFirst {
    /// A time in the earlier period.
    pub at_ms: u64,
}

impl std::fmt::Display for FinalizeFirst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "an earlier billing period (containing {}) has usage and no invoice: finalise it first",
            utc(self.at_ms)
        )
    }
}

impl std::error::Error for FinalizeFirst {}

/// The latest finalised invoice of `account` before the period starting at `start_ms`.
fn previous_invoice(
    store: &dyn crate::Store,
    account: &str,
    start_ms: u64,
) -> Result<Option<crate::storage::StoredInvoice>> {
    Ok(store
        .invoices(Some(account))?
        .into_iter()
        .filter(|i| i.period_start_ms < start_ms)
        .max_by_key(|i| i.period_start_ms))
}

/// The late usage an invoice of the period starting at `start_ms` bills: usage of periods
/// already invoiced (windows before the previous invoice's end) that arrived after that
/// invoice's cut, up to `until_ms` (this invoice's cut; `None` for a draft). Every stored unit
/// is billed once: by its period's invoice if it arrived before that invoice's cut, else by
/// the first invoice cut after it arrived.
fn late_usage(
    store: &dyn crate::Store,
    account: &str,
    start_ms: u64,
    until_ms: Option<u64>,
) -> Result<Vec<BillableUsage>> {
    match previous_invoice(store, account, start_ms)? {
        Some(previous) => {
            store.late_usage(account, previous.period_end_ms, previous.cut_ms, until_ms)
        }
        None => Ok(Vec::new()),
    }
}

/// The invoice draft of `account` for the billing period containing `at_ms`, as of `now_ms`.
pub fn draft(
    store: &dyn crate::Store,
    catalog: &Catalog,
    account: &str,
    at_ms: u64,
    now_ms: u64,
) -> Result<Draft> {
    let bounds = catalog.period_bounds(catalog.billing_period, at_ms);
    let usage = store.billable_usage(account, bounds.0, bounds.1, None)?;
    // While an earlier period with usage waits for its invoice (its grace period), late usage
    // goes to that invoice, not to this draft.
    let waiting = match previous_invoice(store, account, bounds.0)? {
        Some(previous) => store
            .first_usage_ms(account, previous.period_end_ms, bounds.0)?
            .is_some(),
        None => true,
    };
    let late = if waiting {
        Vec::new()
    } else {
        late_usage(store, account, bounds.0, None)?
    };
    let licenses = store.issued_licenses(Some(account))?;
    let users = store
        .active_users(account, bounds.0, bounds.1, None)?
        .by_license;
    let invoice = rate_with_users(catalog, account, bounds, &usage, &late, &licenses, &users)?;
    let ended = now_ms >= bounds.1;
    let not_forecast = stopped_licenses(store, account, &licenses, &usage)?;
    let stopped = not_forecast.iter().map(|s| s.license.clone()).collect();
    let forecast_total = if ended {
        None
    } else {
        forecast(
            catalog, account, bounds, &usage, &late, &licenses, &users, &stopped, now_ms,
        )?
        .map(|f| f.total)
    };
    let display = invoice.lines.iter().map(line_display).collect();
    Ok(Draft {
        invoice,
        status: if ended { "complete" } else { "draft" },
        as_of_ms: now_ms,
        forecast_total,
        not_forecast,
        display,
    })
}

/// The account's licenses (issued, or with usage) that are refused every request now: revoked
/// ones, and all of them while the account is suspended.
pub fn stopped_licenses(
    store: &dyn crate::Store,
    account: &str,
    licenses: &[IssuedLicense],
    usage: &[BillableUsage],
) -> Result<Vec<Stopped>> {
    let names: std::collections::BTreeSet<String> = licenses
        .iter()
        .filter(|l| l.account == account)
        .map(|l| l.license.clone())
        .chain(usage.iter().map(|u| u.license.clone()))
        .collect();
    let names: Vec<String> = names.into_iter().collect();
    let restrictions = store.restrictions(&names, &[account.to_string()])?;
    let suspended = restrictions.suspended.get(account);
    Ok(names
        .into_iter()
        .filter_map(|license| {
            if let Some(reason) = restrictions.revoked.get(&license) {
                Some(Stopped {
                    license,
                    standing: "revoked",
                    reason: reason.clone(),
                })
            } else {
                suspended.map(|reason| Stopped {
                    license,
                    standing: "suspended",
                    reason: reason.clone(),
                })
            }
        })
        .collect())
}

/// Finalise `account`'s invoice for the billing period containing `at_ms`: rate it once more
/// and freeze it, with an `invoice.finalized` event enqueued in the same transaction. The
/// invoice bills the period's usage received up to its cut (`now_ms - SETTLE_MS`) and the late
/// usage of earlier periods (see [`late_usage`]). A period finalised before gives the stored
/// invoice. Refused (409) while the period runs, when a later period of the account is
/// finalised, when the period overlaps another invoice (the catalogue's time zone or billing
/// period changed), and ([`FinalizeFirst`]) while an earlier period with usage has no invoice.
pub fn finalize(
    store: &dyn crate::Store,
    catalog: &Catalog,
    account: &str,
    at_ms: u64,
    now_ms: u64,
) -> Result<(crate::storage::StoredInvoice, bool)> {
    let bounds = catalog.period_bounds(catalog.billing_period, at_ms);
    let conflict = |message: String| -> anyhow::Error {
        crate::errors::Invalid {
            message,
            conflict: true,
        }
        .into()
    };
    if now_ms < bounds.1 {
        return Err(conflict(format!(
            "the billing period {} to {} has not ended: its invoice can only be a draft",
            rfc3339(catalog.time_zone, bounds.0),
            rfc3339(catalog.time_zone, bounds.1)
        )));
    }
    let existing = store.invoices(Some(account))?;
    // The same period by its bounds, not its id: invoices finalised before ids named the
    // local start (`acme/2026-10-31T23:00:00Z`) are the same invoice, never a second one.
    if let Some(same) = existing
        .iter()
        .find(|i| (i.period_start_ms, i.period_end_ms) == bounds)
    {
        return Ok((same.clone(), false));
    }
    if let Some(other) = existing
        .iter()
        .find(|i| i.period_start_ms < bounds.1 && i.period_end_ms > bounds.0)
    {
        return Err(conflict(format!(
            "the period {} to {} overlaps invoice {}: the catalogue's time zone or billing period changed since",
            rfc3339(catalog.time_zone, bounds.0),
            rfc3339(catalog.time_zone, bounds.1),
            other.invoice_id
        )));
    }
    if let Some(later) = existing.iter().find(|i| i.period_start_ms >= bounds.1) {
        return Err(conflict(format!(
            "a later period is finalised ({}): periods are finalised in order",
            later.invoice_id
        )));
    }
    let previous_end = existing
        .iter()
        .filter(|i| i.period_start_ms < bounds.0)
        .map(|i| i.period_end_ms)
        .max()
        .unwrap_or(0);
    if let Some(at_ms) = store.first_usage_ms(account, previous_end, bounds.0)? {
        return Err(FinalizeFirst { at_ms }.into());
    }
    let cut_ms = now_ms.saturating_sub(SETTLE_MS).max(bounds.1);
    let usage = store.billable_usage(account, bounds.0, bounds.1, Some(cut_ms))?;
    let late = late_usage(store, account, bounds.0, Some(cut_ms))?;
    let licenses = store.issued_licenses(Some(account))?;
    // Users first seen in usage received after the cut are not charged (their calls are, as
    // late usage of the next invoice).
    let users = store
        .active_users(account, bounds.0, bounds.1, Some(cut_ms))?
        .by_license;
    let invoice = rate_with_users(catalog, account, bounds, &usage, &late, &licenses, &users)?;
    let body = serde_json::to_value(&invoice)?;
    let stored = crate::storage::StoredInvoice {
        invoice_id: invoice.invoice_id.clone(),
        account: account.to_string(),
        period_start_ms: bounds.0,
        period_end_ms: bounds.1,
        currency: invoice.currency.clone(),
        total: invoice.total.to_string(),
        body: body.clone(),
        finalized_ms: now_ms,
        cut_ms,
    };
    // Enqueued whether or not webhooks are configured: a URL configured later delivers it.
    let event = crate::webhooks::event(
        format!("invoice.finalized:{}", invoice.invoice_id),
        "invoice.finalized",
        serde_json::json!({"invoice": body}),
        now_ms,
    );
    store.finalize_invoice(&stored, Some(&event))
}

/// Finalise the period containing `at_ms`, and first every earlier period of the account
/// that has usage and no invoice (at most 48 of them).
pub fn finalize_in_order(
    store: &dyn crate::Store,
    catalog: &Catalog,
    account: &str,
    at_ms: u64,
    now_ms: u64,
) -> Result<Vec<(crate::storage::StoredInvoice, bool)>> {
    let mut pending = vec![at_ms];
    let mut done = Vec::new();
    while let Some(&next) = pending.last() {
        match finalize(store, catalog, account, next, now_ms) {
            Ok(finalized) => {
                done.push(finalized);
                pending.pop();
            }
            Err(e) => match e.downcast_ref::<FinalizeFirst>() {
                Some(first) if pending.len() < 48 => pending.push(first.at_ms),
                _ => return Err(e),
            },
        }
    }
    Ok(done)
}
