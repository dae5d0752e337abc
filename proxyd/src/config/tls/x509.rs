//! The serial number and the two dates of an X.509 certificate, read from its DER, and the
//! calendar arithmetic that turns the dates into unix seconds and back into text for messages.
//!
//! webpki parses and checks the certificate as a whole but keeps these to itself; this walks
//! the few fields in front of the validity (RFC 5280 §4.1) and nothing else.

/// Reads one DER element at the start of `input`: (tag, contents, rest). Definite lengths only,
/// as DER requires; up to 2^32 - 1 bytes.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n @ 0..=0x7f => (usize::from(n), rest),
        0x81..=0x84 => {
            let octets = usize::from(first & 0x7f);
            if rest.len() < octets {
                return None;
            }
            let (bytes, rest) = rest.split_at(octets);
            let len = bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b));
            (len, rest)
        }
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// What a certificate says of itself that an operator asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fields {
    /// Upper-case hex without leading zero bytes, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// The serial, notBefore and notAfter of a DER certificate.
pub(crate) fn fields(cert: &[u8]) -> Option<Fields> {
    let (SEQUENCE, cert, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let (mut tag, mut field, mut rest) = element(tbs)?;
    if tag == VERSION {
        (tag, field, rest) = element(rest)?;
    }
    let serial = hex((tag == INTEGER).then_some(field)?);
    let (SEQUENCE, _signature, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, _issuer, rest) = element(rest)? else {
        return None;
    };
    let (SEQUENCE, validity, _) = element(rest)? else {
        return None;
    };
    let (tag, before, rest) = element(validity)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = element(rest)?;
    Some(Fields {
        serial,
        not_before,
        not_after: time(tag, after)?,
    })
}

/// An INTEGER's content octets in hex, without the zero octets DER puts in front of a
/// positive number whose first bit is set.
fn hex(integer: &[u8]) -> String {
    let first = integer
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(integer.len().saturating_sub(1));
    integer[first..]
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the
/// only two forms RFC 5280 allows, in unix seconds.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        s.iter().try_fold(0i64, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
        })
    };
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && hour < 24
        && minute < 60
        && second < 61;
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of unix seconds as `YYYY-MM-DD` (UTC), for messages.
pub fn date(unix: i64) -> String {
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_through_unix_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(-86_400), "1969-12-31");
        for days in [-1000, 0, 59, 10_957, 19_000, 30_000] {
            let d = date(days * 86_400);
            let p: Vec<i64> = d.split('-').map(|x| x.parse().expect("digits")).collect();
            assert_eq!(days_from_civil(p[0], p[1], p[2]), days, "{d}");
        }
    }

    #[test]
    fn both_time_forms_and_nothing_else() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20491231235959Z"),
            Some(2_524_607_999)
        );
        assert_eq!(
            time(GENERALIZED_TIME, b"99991231235959Z"),
            Some(253_402_300_799)
        );
        assert_eq!(time(UTC_TIME, b"700101000000+0100"), None);
        assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
        assert_eq!(time(GENERALIZED_TIME, b"700101000000Z"), None);
        assert_eq!(time(UTC_TIME, b"7001010000x0Z"), None);
    }

    #[test]
    fn truncated_or_wrong_der_is_none() {
        assert_eq!(fields(b""), None);
        assert_eq!(fields(&[0x30, 0x05, 0x30]), None);
        assert_eq!(fields(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
        assert_eq!(fields(&[0x04, 0x00]), None);
    }

    #[test]
    fn serials_print_as_openssl_does() {
        assert_eq!(hex(&[0x00, 0x9f, 0x01]), "9F01");
        assert_eq!(hex(&[0x12, 0x00]), "1200");
        assert_eq!(hex(&[0x00]), "00");
        assert_eq!(hex(&[]), "");
    }
}
