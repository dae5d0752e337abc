//! Durations like "5m" and sizes like "5k", as HAProxy writes them, for TOML configs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written `<number><unit>` with unit `us`, `ms`, `s`, `m`, `h` or `d`
/// (a bare number is milliseconds, as in HAProxy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

/// A count written `<number>[k|m|g]`; the suffixes are powers of 1024, as in HAProxy
/// (`size 5k` is 5120 entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("'{0}' does not start with a number")]
    NoNumber(String),
    #[error("unknown unit '{unit}' in '{value}' (expected {expected})")]
    UnknownUnit {
        value: String,
        unit: String,
        expected: &'static str,
    },
    #[error("'{0}' is too large")]
    Overflow(String),
}

fn split_number(s: &str) -> Result<(u64, &str), UnitError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Err(UnitError::NoNumber(s.to_owned()));
    }
    let n = s[..end]
        .parse::<u64>()
        .map_err(|_| UnitError::Overflow(s.to_owned()))?;
    Ok((n, s[end..].trim()))
}

impl FromStr for Duration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let (n, unit) = split_number(s)?;
        let micros_per: u64 = match unit {
            "us" => 1,
            "" | "ms" => 1_000,
            "s" => 1_000_000,
            "m" => 60_000_000,
            "h" => 3_600_000_000,
            "d" => 86_400_000_000,
            _ => {
                return Err(UnitError::UnknownUnit {
                    value: s.to_owned(),
                    unit: unit.to_owned(),
                    expected: "us, ms, s, m, h or d",
                });
            }
        };
        let us = n
            .checked_mul(micros_per)
            .ok_or_else(|| UnitError::Overflow(s.to_owned()))?;
        Ok(Duration(std::time::Duration::from_micros(us)))
    }
}

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, UnitError> {
        let (n, unit) = split_number(s)?;
        let mul: u64 = match unit {
            "" => 1,
            "k" | "K" => 1 << 10,
            "m" | "M" => 1 << 20,
            "g" | "G" => 1 << 30,
            _ => {
                return Err(UnitError::UnknownUnit {
                    value: s.to_owned(),
                    unit: unit.to_owned(),
                    expected: "k, m or g",
                });
            }
        };
        n.checked_mul(mul)
            .map(Size)
            .ok_or_else(|| UnitError::Overflow(s.to_owned()))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        let (n, u) = [
            (86_400_000_000u128, "d"),
            (3_600_000_000, "h"),
            (60_000_000, "m"),
            (1_000_000, "s"),
            (1_000, "ms"),
        ]
        .into_iter()
        .find(|(d, _)| us.is_multiple_of(*d) && us >= *d)
        .map_or((us, "us"), |(d, u)| (us / d, u));
        write!(f, "{n}{u}")
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        let (v, u) = [(1u64 << 30, "g"), (1 << 20, "m"), (1 << 10, "k")]
            .into_iter()
            .find(|(d, _)| n.is_multiple_of(*d) && n >= *d)
            .map_or((n, ""), |(d, u)| (n / d, u));
        write!(f, "{v}{u}")
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

/// Accepts a string with a unit, or a bare integer (milliseconds for durations).
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Int(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(ms) => Ok(Duration(std::time::Duration::from_millis(ms))),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as StdDuration;

    #[test]
    fn durations_parse_with_haproxy_units() {
        assert_eq!(
            "5m".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(300))
        );
        assert_eq!(
            "100ms".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_millis(100))
        );
        assert_eq!(
            "250".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_millis(250))
        );
        assert_eq!(
            "2s".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(2))
        );
        assert_eq!(
            "1d".parse::<Duration>().map(|d| d.0),
            Ok(StdDuration::from_secs(86_400))
        );
        assert!(matches!(
            "5x".parse::<Duration>(),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "m5".parse::<Duration>(),
            Err(UnitError::NoNumber(_))
        ));
        assert_eq!("".parse::<Duration>(), Err(UnitError::Empty));
        assert!(matches!(
            "99999999999999999999d".parse::<Duration>(),
            Err(UnitError::Overflow(_))
        ));
    }

    #[test]
    fn sizes_use_powers_of_1024() {
        assert_eq!("5k".parse::<Size>(), Ok(Size(5120)));
        assert_eq!("1m".parse::<Size>(), Ok(Size(1 << 20)));
        assert_eq!("42".parse::<Size>(), Ok(Size(42)));
        assert!(matches!(
            "5kb".parse::<Size>(),
            Err(UnitError::UnknownUnit { .. })
        ));
    }

    #[test]
    fn display_round_trips() {
        for s in ["5m", "100ms", "2s", "1d", "1500us"] {
            assert_eq!(
                s.parse::<Duration>().map(|d| d.to_string()).as_deref(),
                Ok(s)
            );
        }
        for s in ["5k", "3", "2g"] {
            assert_eq!(s.parse::<Size>().map(|d| d.to_string()).as_deref(), Ok(s));
        }
    }
}
