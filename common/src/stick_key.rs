//! Stick-table keys: a table's key type and the one canonical text of a key of that type.
//!
//! stickd stores and replicates keys in this form and proxyd looks them up in it, so both must
//! write a key the same way: an address parsed and printed again (`" 10.0.0.1"` and `10.0.0.1`
//! are one client), an integer in plain decimal, a string kept as it is but bounded and free of
//! control characters. Nothing here allocates for a string key.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr};

/// Longest key text of ip, ipv6 and integer tables: an IPv6 address is at most 45 characters,
/// an integer 20; the rest leaves room for surrounding spaces.
pub const MAX_TYPED_KEY_LEN: usize = 64;

/// Key type of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    Ip,
    Ipv6,
    Integer,
    /// Text of at most `len` bytes.
    String {
        len: u32,
    },
}

impl KeyType {
    /// The type's name, as in configs and in the proto's `TableInfo.type`.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Ip => "ip",
            KeyType::Ipv6 => "ipv6",
            KeyType::Integer => "integer",
            KeyType::String { .. } => "string",
        }
    }

    /// Maximum key length of string tables (0 for the others, as in the proto).
    pub fn max_len(self) -> u32 {
        match self {
            KeyType::String { len } => len,
            _ => 0,
        }
    }

    /// The type a proto `TableInfo` or `TableDef` names (`type` and `len`); `None` for a name
    /// this version does not know.
    pub fn from_name(name: &str, len: u32) -> Option<KeyType> {
        match name {
            "ip" => Some(KeyType::Ip),
            "ipv6" => Some(KeyType::Ipv6),
            "integer" => Some(KeyType::Integer),
            "string" => Some(KeyType::String { len }),
            _ => None,
        }
    }
}

/// Why a key does not fit its table's type. The caller names the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key '{key}' is not {expected}")]
    Bad {
        /// The key's first 80 characters.
        key: String,
        expected: &'static str,
    },
    #[error(
        "key of {len} bytes is longer than the table's len {max} (keys are refused, not truncated)"
    )]
    TooLong { len: usize, max: u32 },
    #[error("key has {what} at byte {at} (control characters are refused in keys)")]
    Control { at: usize, what: &'static str },
}

/// Checks `key` against `key_type` and returns its canonical text: borrowed for a string key
/// (checked, never changed), owned for an address or an integer (parsed and printed again).
pub fn canonical(key_type: KeyType, key: &str) -> Result<Cow<'_, str>, KeyError> {
    let bad = |expected| KeyError::Bad {
        key: key.chars().take(80).collect(),
        expected,
    };
    // Parsing trims spaces: bound what it is given first.
    if !matches!(key_type, KeyType::String { .. }) && key.len() > MAX_TYPED_KEY_LEN {
        return Err(KeyError::TooLong {
            len: key.len(),
            max: MAX_TYPED_KEY_LEN as u32,
        });
    }
    match key_type {
        KeyType::Ip => key
            .trim()
            .parse::<Ipv4Addr>()
            .map(|a| Cow::Owned(a.to_string()))
            .map_err(|_| bad("an IPv4 address")),
        KeyType::Ipv6 => match key.trim().parse::<IpAddr>() {
            Ok(IpAddr::V6(a)) => Ok(Cow::Owned(a.to_string())),
            Ok(IpAddr::V4(a)) => Ok(Cow::Owned(a.to_ipv6_mapped().to_string())),
            Err(_) => Err(bad("an IPv6 (or IPv4) address")),
        },
        KeyType::Integer => key
            .trim()
            .parse::<i64>()
            .map(|n| Cow::Owned(n.to_string()))
            .map_err(|_| bad("a 64-bit integer")),
        KeyType::String { len } => {
            if key.is_empty() {
                return Err(bad("a non-empty string"));
            }
            if key.len() > len as usize {
                return Err(KeyError::TooLong {
                    len: key.len(),
                    max: len,
                });
            }
            check_chars(key)?;
            Ok(Cow::Borrowed(key))
        }
    }
}

/// [`canonical`] of a key the caller owns: a string key is checked and kept, not copied.
pub fn canonical_owned(key_type: KeyType, key: String) -> Result<String, KeyError> {
    match canonical(key_type, &key)? {
        Cow::Borrowed(_) => Ok(key),
        Cow::Owned(k) => Ok(k),
    }
}

/// The key of a client address in a table of `key_type`, as [`canonical`] would write it:
/// an IPv4 address in an `ipv6` table is IPv4-mapped, an IPv4-mapped IPv6 address in an `ip`
/// table is its IPv4 address. `None` where the address has no key of that type (another IPv6
/// address in an `ip` table, or a table that is not an address table).
pub fn address_key(key_type: KeyType, ip: IpAddr) -> Option<String> {
    match (key_type, ip) {
        (KeyType::Ip, IpAddr::V4(a)) => Some(a.to_string()),
        (KeyType::Ip, IpAddr::V6(a)) => a.to_ipv4_mapped().map(|v4| v4.to_string()),
        (KeyType::Ipv6, IpAddr::V4(a)) => Some(a.to_ipv6_mapped().to_string()),
        (KeyType::Ipv6, IpAddr::V6(a)) => Some(a.to_string()),
        (KeyType::Integer | KeyType::String { .. }, _) => None,
    }
}

/// Refuses control characters in a string key: a NUL or a newline in a key breaks every
/// line-oriented view of the table (logs, grpcurl output, HAProxy-style dumps) and no cookie or
/// header value that proxyd stores can hold one.
fn check_chars(key: &str) -> Result<(), KeyError> {
    let Some(at) = key.bytes().position(|b| b < 0x20 || b == 0x7f) else {
        return Ok(());
    };
    let what = match key.as_bytes()[at] {
        0 => "a NUL",
        b'\n' => "a newline",
        b'\r' => "a carriage return",
        b'\t' => "a tab",
        _ => "a control character",
    };
    Err(KeyError::Control { at, what })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_keys_are_parsed_and_printed_again() {
        assert_eq!(
            canonical(KeyType::Ip, " 10.0.0.1 ").expect("canonical"),
            "10.0.0.1"
        );
        assert_eq!(
            canonical(KeyType::Ipv6, "10.0.0.1").expect("canonical"),
            "::ffff:10.0.0.1"
        );
        assert_eq!(
            canonical(KeyType::Ipv6, "2001:DB8::0:1").expect("canonical"),
            "2001:db8::1"
        );
        assert_eq!(
            canonical(KeyType::Integer, " -007").expect("canonical"),
            "-7"
        );
        assert!(matches!(
            canonical(KeyType::Ip, "10.0.0.300"),
            Err(KeyError::Bad {
                expected: "an IPv4 address",
                ..
            })
        ));
        assert!(matches!(
            canonical(KeyType::Ip, "::1"),
            Err(KeyError::Bad { .. })
        ));
        assert!(matches!(
            canonical(KeyType::Integer, &" ".repeat(65)),
            Err(KeyError::TooLong { len: 65, max: 64 })
        ));
    }

    #[test]
    fn string_keys_are_bounded_and_kept_as_they_are() {
        let t = KeyType::String { len: 8 };
        assert!(matches!(canonical(t, " a b "), Ok(Cow::Borrowed(" a b "))));
        assert!(matches!(canonical(t, ""), Err(KeyError::Bad { .. })));
        assert_eq!(
            canonical(t, "123456789").expect_err("refused").to_string(),
            "key of 9 bytes is longer than the table's len 8 (keys are refused, not truncated)"
        );
        assert_eq!(
            canonical(t, "a\nb").expect_err("refused"),
            KeyError::Control {
                at: 1,
                what: "a newline"
            }
        );
        assert!(matches!(
            canonical(t, "a\x7f"),
            Err(KeyError::Control { at: 1, .. })
        ));
        assert_eq!(canonical_owned(t, "ab".into()).expect("canonical"), "ab");
        assert_eq!(
            canonical_owned(KeyType::Ip, "1.2.3.4 ".into()).expect("canonical"),
            "1.2.3.4"
        );
    }

    #[test]
    fn address_keys_are_the_canonical_text_of_the_address() {
        let v4: IpAddr = "192.0.2.7".parse().expect("address");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("address");
        let v6: IpAddr = "2001:db8::7".parse().expect("address");
        for (t, ip, want) in [
            (KeyType::Ip, v4, Some("192.0.2.7")),
            (KeyType::Ip, mapped, Some("192.0.2.7")),
            (KeyType::Ip, v6, None),
            (KeyType::Ipv6, v4, Some("::ffff:192.0.2.7")),
            (KeyType::Ipv6, mapped, Some("::ffff:192.0.2.7")),
            (KeyType::Ipv6, v6, Some("2001:db8::7")),
            (KeyType::Integer, v4, None),
        ] {
            let got = address_key(t, ip);
            assert_eq!(got.as_deref(), want, "{t:?} {ip}");
            if let Some(k) = got {
                assert_eq!(canonical(t, &k).expect("canonical"), k, "{t:?} {ip}");
            }
        }
        assert_eq!(
            KeyType::from_name("string", 32),
            Some(KeyType::String { len: 32 })
        );
        assert_eq!(KeyType::from_name("ipv6", 0), Some(KeyType::Ipv6));
        assert_eq!(KeyType::from_name("uuid", 0), None);
    }
}
