//! What the command line prints for people: tables and `field: value` lines, times in
//! RFC 3339 in the catalogue's time zone. `--json` prints the records themselves instead, for
//! machines; these views only arrange what the records hold, they compute nothing.

use chrono_tz::Tz;

use crate::billing::{Draft, LineKind};
use crate::control::{AccountStatus, UsersReport};
use crate::licensing::{KeyInfo, ShownLicense};
use crate::storage::IssuedLicense;

/// A time as people read it: RFC 3339 to the second, in `tz` (the catalogue's zone, or UTC).
pub fn time(tz: Tz, ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| {
            t.with_timezone(&tz)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Columns as wide as their widest cell, two spaces apart; the columns marked in `right`
/// (numbers) are aligned right.
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A column whose name starts with `>` is aligned right (the `>` is not printed).
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let text: Vec<String> = cells
                .zip(&widths)
                .zip(&self.right)
                .map(|((cell, &width), &right)| {
                    if right {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect();
            text.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(&mut self.header.iter().copied());
        for row in &self.rows {
            out += &line(&mut row.iter().map(String::as_str));
        }
        out
    }
}

/// `field: value` lines, the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// A flat record (counts): its fields as `field: value` lines, in its own order.
pub fn record(value: &serde_json::Value) -> String {
    let Some(object) = value.as_object() else {
        return format!("{value}\n");
    };
    let pairs: Vec<(&str, String)> = object
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            (k.as_str(), text)
        })
        .collect();
    fields(&pairs)
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".into())
}

pub fn keys(tz: Tz, keys: &[KeyInfo]) -> String {
    let mut table = Table::new(&[
        "kid",
        "alg",
        "state",
        "signs",
        "created",
        "activates",
        "retired",
    ]);
    for k in keys {
        table.row(vec![
            k.kid.clone(),
            k.alg.clone(),
            k.state.into(),
            if k.signing { "yes" } else { "no" }.into(),
            time(tz, k.created_ms),
            time(tz, k.activates_ms),
            or_dash(k.retired_ms.map(|ms| time(tz, ms))),
        ]);
    }
    table.render()
}

pub fn key(tz: Tz, k: &KeyInfo) -> String {
    fields(&[
        ("key", k.kid.clone()),
        ("alg", k.alg.clone()),
        ("state", k.state.into()),
        ("signs", if k.signing { "yes" } else { "no" }.into()),
        ("activates", time(tz, k.activates_ms)),
        ("public key", k.public_jwk.to_string()),
    ])
}

/// Whether a license is valid at `now_ms`, in a word.
fn standing(l: &IssuedLicense, now_ms: u64) -> &'static str {
    if l.revoked_ms.is_some() {
        "revoked"
    } else if now_ms < l.not_before_ms {
        "not yet valid"
    } else if now_ms >= l.expires_ms {
        "expired"
    } else {
        "valid"
    }
}

pub fn licenses(tz: Tz, licenses: &[ShownLicense], now_ms: u64) -> String {
    let mut table = Table::new(&[
        "license", "account", "plan", "features", "standing", "from", "until", "key",
    ]);
    for l in licenses.iter().map(|shown| &shown.license) {
        table.row(vec![
            l.license.clone(),
            l.account.clone(),
            l.plan.clone(),
            l.features.join(","),
            standing(l, now_ms).into(),
            time(tz, l.not_before_ms),
            time(tz, l.expires_ms),
            l.kid.clone(),
        ]);
    }
    table.render()
}

/// One license, and why it is revoked if it is.
pub fn license(tz: Tz, shown: &ShownLicense, now_ms: u64) -> String {
    let l = &shown.license;
    let mut pairs = vec![
        ("license", l.license.clone()),
        ("account", l.account.clone()),
        ("plan", l.plan.clone()),
        ("features", l.features.join(", ")),
        ("limits", or_dash(l.limits.as_ref().map(|v| v.to_string()))),
        ("standing", standing(l, now_ms).into()),
        ("valid from", time(tz, l.not_before_ms)),
        ("valid until", time(tz, l.expires_ms)),
        ("issued", time(tz, l.issued_ms)),
        ("signed by key", l.kid.clone()),
    ];
    if let Some(ms) = l.revoked_ms {
        pairs.push(("revoked", time(tz, ms)));
    }
    if let Some(reason) = &shown.revoked {
        pairs.push(("revoked because", reason.clone()));
    }
    fields(&pairs)
}

fn line_kind(kind: LineKind) -> &'static str {
    match kind {
        LineKind::Subscription => "fee",
        LineKind::Usage => "usage",
        LineKind::Cap => "cap",
        LineKind::Minimum => "minimum",
        LineKind::ActiveUsers => "active users",
    }
}

/// The table of an invoice's lines.
fn lines_table() -> Table {
    Table::new(&[
        "kind",
        "license",
        "plan",
        "description",
        ">quantity",
        ">unit price",
        ">amount",
    ])
}

/// `0.001`, or `2.50 per 1000`: a unit price as the catalogue states it.
fn price(unit_price: &str, per: &str) -> String {
    if per == "1" {
        unit_price.to_string()
    } else {
        format!("{unit_price} per {per}")
    }
}

pub fn invoice(tz: Tz, draft: &Draft) -> String {
    let invoice = &draft.invoice;
    let mut out = fields(&[
        ("invoice", invoice.invoice_id.clone()),
        ("account", invoice.account.clone()),
        (
            "period",
            format!("{} to {}", invoice.period_start, invoice.period_end),
        ),
        ("status", draft.status.into()),
        ("as of", time(tz, draft.as_of_ms)),
        ("currency", invoice.currency.clone()),
    ]);
    out.push('\n');
    let mut table = lines_table();
    for l in &invoice.lines {
        table.row(vec![
            format!(
                "{}{}",
                line_kind(l.kind),
                if l.late { " (late)" } else { "" }
            ),
            l.license.clone(),
            l.plan.clone(),
            l.description.clone(),
            l.quantity.to_string(),
            price(&l.unit_price.to_string(), &l.per.to_string()),
            l.amount.to_string(),
        ]);
    }
    out += &table.render();
    out += &format!("\ntotal: {} {}\n", invoice.total, invoice.currency);
    if let Some(forecast) = draft.forecast_total {
        out += &format!(
            "forecast at the period's end: {forecast} {}\n",
            invoice.currency
        );
    }
    if !invoice.unpriced.is_empty() {
        out += "\nnot charged (the catalogue has no price for it):\n";
        let mut table = Table::new(&["license", "plan", "feature", "meter", ">units"]);
        for u in &invoice.unpriced {
            table.row(vec![
                u.license.clone(),
                or_dash((!u.plan.is_empty()).then(|| u.plan.clone())),
                u.feature.clone(),
                u.meter.clone(),
                u.units.to_string(),
            ]);
        }
        out += &table.render();
    }
    out
}

/// A finalised invoice, from the body stored when it was cut.
pub fn finalized(tz: Tz, invoice: &crate::storage::StoredInvoice) -> String {
    let text = |v: &serde_json::Value, key: &str| -> String {
        match &v[key] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        }
    };
    let mut out = fields(&[
        ("invoice", invoice.invoice_id.clone()),
        ("account", invoice.account.clone()),
        (
            "period",
            format!(
                "{} to {}",
                time(tz, invoice.period_start_ms),
                time(tz, invoice.period_end_ms)
            ),
        ),
        ("status", "final".into()),
        ("finalised", time(tz, invoice.finalized_ms)),
        ("usage received until", time(tz, invoice.cut_ms)),
        ("currency", invoice.currency.clone()),
    ]);
    out.push('\n');
    let mut table = lines_table();
    for l in invoice.body["lines"].as_array().into_iter().flatten() {
        table.row(vec![
            text(l, "kind").replace('_', " "),
            text(l, "license"),
            text(l, "plan"),
            text(l, "description"),
            text(l, "quantity"),
            price(&text(l, "unit_price"), &text(l, "per")),
            text(l, "amount"),
        ]);
    }
    out += &table.render();
    out += &format!("\ntotal: {} {}\n", invoice.total, invoice.currency);
    out
}

pub fn account(tz: Tz, status: &AccountStatus) -> String {
    fields(&[
        ("account", status.account.clone()),
        (
            "suspended",
            status
                .suspended
                .clone()
                .map_or_else(|| "no".into(), |why| format!("yes: {why}")),
        ),
        (
            "budget",
            status.budget.as_ref().map_or_else(
                || "none".into(),
                |b| format!("{} {} per {}", b.amount, status.currency, b.period.as_str()),
            ),
        ),
        (
            "period",
            format!(
                "{} to {}",
                time(tz, status.period_start_ms),
                time(tz, status.period_end_ms)
            ),
        ),
        ("spend", format!("{} {}", status.spend, status.currency)),
        (
            "spend cap reached",
            if status.spend_cap_reached {
                "yes: requests are refused (402) until the period ends"
            } else {
                "no"
            }
            .into(),
        ),
    ])
}

pub fn users(tz: Tz, report: &UsersReport) -> String {
    let mut out = fields(&[
        ("account", report.account.clone()),
        (
            "billing period",
            format!(
                "{} to {}",
                time(tz, report.period_start_ms),
                time(tz, report.period_end_ms)
            ),
        ),
        ("active users", report.active_users.users.to_string()),
    ]);
    let count_table = |name: &'static str, counts: &std::collections::BTreeMap<String, u64>| {
        let mut table = Table::new(&[name, ">active users"]);
        for (key, users) in counts {
            table.row(vec![key.clone(), users.to_string()]);
        }
        table.render()
    };
    if !report.active_users.by_license.is_empty() {
        out += "\n";
        out += &count_table("license", &report.active_users.by_license);
    }
    if !report.active_users.by_feature.is_empty() {
        out += "\n";
        out += &count_table("feature", &report.active_users.by_feature);
    }
    out += "\nseats taken now:\n";
    if report.seats.is_empty() {
        out += "  none (no license of this account has seats)\n";
    } else {
        let mut table = Table::new(&["license", "kind", ">in use", ">limit"]);
        for s in &report.seats {
            table.row(vec![
                s.license.clone(),
                s.kind.clone(),
                s.in_use.to_string(),
                s.limit.to_string(),
            ]);
        }
        out += &table.render();
    }
    out += "\nsharing detections:\n";
    if report.sharing.is_empty() {
        out += "  none\n";
    } else {
        let mut table = Table::new(&["license", ">clients", ">max", "detected", "blocked until"]);
        for s in &report.sharing {
            table.row(vec![
                s.license.clone(),
                s.clients.to_string(),
                s.max_clients.to_string(),
                time(tz, s.detected_ms),
                or_dash(s.blocked_until_ms.map(|ms| time(tz, ms))),
            ]);
        }
        out += &table.render();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_fits_its_widest_cell_and_aligns_numbers_right() {
        let mut table = Table::new(&["license", ">units"]);
        table.row(vec!["lic-a-very-long-license-id".into(), "7".into()]);
        table.row(vec!["b".into(), "1000".into()]);
        assert_eq!(
            table.render(),
            "license                     units\n\
             lic-a-very-long-license-id      7\n\
             b                            1000\n"
        );
    }

    #[test]
    fn times_are_in_the_zone_given() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap_or(Tz::UTC);
        assert_eq!(time(berlin, 1_793_487_600_000), "2026-11-01T00:00:00+01:00");
        assert_eq!(time(Tz::UTC, 1_793_487_600_000), "2026-10-31T23:00:00Z");
    }
}
