//! Tests that run the collector on the real clock with daily or monthly periods (quotas,
//! budgets, named seats) must not straddle a period's end: a test that starts at 23:59 UTC
//! would see its quota start over half way. The collector computes periods in its catalogue's
//! time zone, so tests give it a zone in which it is midday now: the next day (and month)
//! boundary is at least six hours away, whatever the date and hour the tests run at.

/// An IANA zone (`Etc/GMT±N`, whole hours) where the local time is now between 06:00 and
/// 18:00.
pub fn midday_time_zone() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let utc_hour = i64::try_from((secs / 3600) % 24).unwrap_or(0);
    zone_for_hour(utc_hour)
}

fn zone_for_hour(utc_hour: i64) -> String {
    // Local = UTC + offset; offsets from -11 to +12 h all exist as Etc/GMT zones, whose names
    // carry the opposite sign (Etc/GMT-3 is UTC+3).
    let offset = 12 - utc_hour;
    match offset {
        0 => "UTC".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

/// A catalogue (the collector's `--plans` file) with no prices, in [`midday_time_zone`].
pub fn midday_catalogue() -> serde_json::Value {
    serde_json::json!({"time_zone": midday_time_zone()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hour_gets_a_zone_where_it_is_midday() {
        for hour in 0..24 {
            let zone = zone_for_hour(hour);
            let offset: i64 = match zone.strip_prefix("Etc/GMT") {
                None => 0,
                Some(rest) => -rest.parse::<i64>().unwrap(),
            };
            assert_eq!((hour + offset).rem_euclid(24), 12, "{hour}: {zone}");
            assert!((-12..=14).contains(&offset), "{zone}");
        }
    }
}
