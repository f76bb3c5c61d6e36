//! UTC timestamps as both admin APIs and `sluicectl` print them (RFC 3339, `Z`).

use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-23T09:17:38.123Z`: `t` in UTC to the millisecond (times before 1970 print as 1970).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}Z", civil(d.as_secs()), d.subsec_millis())
}

/// `2026-11-23T09:17:38Z`: `unix_ms` (milliseconds since the Unix epoch) in UTC, to the second.
pub fn rfc3339_seconds(unix_ms: u64) -> String {
    format!("{}Z", civil(unix_ms / 1000))
}

/// `YYYY-MM-DDTHH:MM:SS` for seconds since the Unix epoch.
fn civil(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_to_the_millisecond_and_to_the_second() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_425_458_123);
        assert_eq!(rfc3339_millis(t), "2026-11-23T09:17:38.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_seconds(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(1_795_425_458_123), "2026-11-23T09:17:38Z");
        // Century years: 2100 is not a leap year, 2000 and 2400 are.
        assert_eq!(rfc3339_seconds(951_868_800_000), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(4_102_444_799_000), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_seconds(4_107_542_399_000), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339_seconds(4_107_542_400_000), "2100-03-01T00:00:00Z");
        assert_eq!(rfc3339_seconds(13_574_606_400_000), "2400-02-29T12:00:00Z");
    }
}
