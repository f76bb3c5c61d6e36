//! Durations as written in policies: `500ms`, `2s`, `1m30s`, `1h`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A policy duration, written as one or more `<integer><unit>` parts (`ms`, `s`, `m`, `h`).
///
/// Kept as a string in YAML (and in the CRD schema) so that users never have to
/// guess whether a bare number means seconds or milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected a duration such as \"500ms\", \"2s\" or \"1m30s\", got {0:?}")]
pub struct DurationParseError(pub String);

impl Duration {
    /// The duration as a `std::time::Duration`.
    pub fn get(self) -> std::time::Duration {
        self.0
    }

    /// Builds a duration from milliseconds.
    pub fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// Builds a duration from seconds.
    pub fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

impl FromStr for Duration {
    type Err = DurationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationParseError(s.to_string());
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err());
            }
            let n: u128 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit_ms: u128 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(err()),
            };
            rest = &rest[unit_len..];
            total = total
                .checked_add(n.checked_mul(unit_ms).ok_or_else(err)?)
                .ok_or_else(err)?;
        }
        let ms = u64::try_from(total).map_err(|_| err())?;
        Ok(Duration::from_millis(ms))
    }
}

impl fmt::Display for Duration {
    /// The canonical spelling: the largest unit that divides the duration exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms != 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"500ms\", \"2s\" or \"1m30s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Durations are strings in the CRD schema too, with the same syntax as in files.
#[cfg(feature = "crd")]
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h))+$",
            "description": "A duration such as \"500ms\", \"2s\" or \"1m30s\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_canonically() {
        for (input, ms, canon) in [
            ("500ms", 500, "500ms"),
            ("2s", 2_000, "2s"),
            ("1m30s", 90_000, "90s"),
            ("1h", 3_600_000, "1h"),
            ("120s", 120_000, "2m"),
            ("0s", 0, "0s"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.get().as_millis(), ms, "{input}");
            assert_eq!(d.to_string(), canon, "{input}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "2",
            "s",
            "2 s",
            "1.5s",
            "2sec",
            "-1s",
            "99999999999999999999h",
        ] {
            assert!(
                bad.parse::<Duration>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
