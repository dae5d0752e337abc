//! The field values and request-target parts that decide framing and routing, parsed on bytes
//! by RFC 9110's grammar, so that the proxy and any server behind it read them the same way.
//!
//! Optional whitespace is SP and HTAB only (RFC 9110 §5.6.3): a value with any other byte
//! where a backend might see whitespace (a no-break space, a vertical tab) is refused rather
//! than trimmed, and the value forwarded is the one parsed here, written anew.

use super::head::HeadError;

/// Longest Content-Length accepted, in digits (below u64::MAX, with room).
const MAX_LENGTH_DIGITS: usize = 18;

/// `value` without leading and trailing SP / HTAB.
pub fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |p| p + 1);
    &value[start..end]
}

/// RFC 9110's `tchar`, defined beside the rules that check field names with it.
pub use crate::rules::is_tchar;

/// The items of a comma-separated list value, each trimmed of OWS; empty items are skipped,
/// as RFC 9110 §5.6.1 asks of recipients.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(trim_ows)
        .filter(|i| !i.is_empty())
}

/// Accumulates the `Content-Length` fields of one message: every value, and every item of a
/// list value, must be the same decimal number (RFC 9112 §6.3), else the framing is ambiguous.
#[derive(Clone, Copy, Debug, Default)]
pub struct ContentLength(Option<u64>);

impl ContentLength {
    pub fn add(&mut self, value: &[u8]) -> Result<(), HeadError> {
        for item in value.split(|b| *b == b',').map(trim_ows) {
            if item.is_empty()
                || item.len() > MAX_LENGTH_DIGITS
                || !item.iter().all(u8::is_ascii_digit)
            {
                return Err(HeadError::Malformed("bad content-length"));
            }
            let n = item.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match self.0 {
                Some(prev) if prev != n => {
                    return Err(HeadError::Malformed("conflicting content-length values"));
                }
                _ => self.0 = Some(n),
            }
        }
        Ok(())
    }

    pub fn get(self) -> Option<u64> {
        self.0
    }
}

/// A transfer coding of a `Transfer-Encoding` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Chunked,
    /// Any other coding: its name, lower-cased, stands in [`TransferCodings::names`].
    Other,
}

/// The transfer codings of a message, in order, from all of its `Transfer-Encoding` fields.
#[derive(Clone, Debug, Default)]
pub struct TransferCodings {
    codings: Vec<Coding>,
    /// The codings' names, lower-cased, joined by ", ": the value forwarded.
    names: Vec<u8>,
}

impl TransferCodings {
    pub fn add(&mut self, value: &[u8]) -> Result<(), HeadError> {
        let mut any = false;
        for item in list_items(value) {
            any = true;
            // Transfer-coding parameters are for codings this proxy does not decode; a token
            // is all a coding it can frame may be.
            if !item.iter().all(|b| is_tchar(*b)) {
                return Err(HeadError::Malformed("bad transfer-encoding"));
            }
            let coding = if item.eq_ignore_ascii_case(b"chunked") {
                Coding::Chunked
            } else {
                Coding::Other
            };
            if !self.names.is_empty() {
                self.names.extend_from_slice(b", ");
            }
            self.names.extend(item.iter().map(u8::to_ascii_lowercase));
            self.codings.push(coding);
        }
        if !any {
            return Err(HeadError::Malformed("empty transfer-encoding"));
        }
        Ok(())
    }

    pub fn codings(&self) -> &[Coding] {
        &self.codings
    }

    /// The value to forward: the codings as parsed, lower-cased, comma-separated.
    pub fn names(&self) -> &[u8] {
        &self.names
    }

    /// Exactly `chunked`: the only coding a request may have here.
    pub fn is_only_chunked(&self) -> bool {
        self.codings == [Coding::Chunked]
    }

    /// How many times `chunked` is applied.
    pub fn chunked_count(&self) -> usize {
        self.codings
            .iter()
            .filter(|c| **c == Coding::Chunked)
            .count()
    }
}

/// Whether `host` is a valid `Host` value: `uri-host [ ":" port ]` (RFC 9110 §7.2), possibly
/// empty. Anything else (spaces, `@`, `/`, control or non-ASCII bytes) could be read as
/// another authority by a server or a log parser.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host.strip_prefix(b"[") {
        Some(rest) => {
            let Some(close) = rest.iter().position(|b| *b == b']') else {
                return false;
            };
            let literal = &rest[..close];
            if literal.is_empty()
                || !literal
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b":.".contains(b))
            {
                return false;
            }
            match &rest[close + 1..] {
                [] => (&[][..], None),
                [b':', port @ ..] => (&[][..], Some(port)),
                _ => return false,
            }
        }
        None => match host.iter().rposition(|b| *b == b':') {
            Some(colon) => (&host[..colon], Some(&host[colon + 1..])),
            None => (host, None),
        },
    };
    let name_ok = name
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b));
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    name_ok && port_ok
}

/// The parts of an absolute-form request target (`http://host/path`).
#[derive(Debug, PartialEq, Eq)]
pub struct AbsoluteTarget<'a> {
    pub authority: &'a [u8],
    /// What follows the authority: empty, a path, or a query (`?q`).
    pub path: &'a [u8],
}

impl AbsoluteTarget<'_> {
    /// The origin-form target to send a server (RFC 9112 §3.2.1): the path, `/` if empty.
    pub fn write_origin_form(&self, out: &mut Vec<u8>) {
        if !self.path.starts_with(b"/") {
            out.push(b'/');
        }
        out.extend_from_slice(self.path);
    }
}

/// Splits an absolute-form target of scheme http or https; `None` for any other form.
pub fn absolute_target(target: &[u8]) -> Option<AbsoluteTarget<'_>> {
    let colon = target.iter().position(|b| *b == b':')?;
    let scheme = &target[..colon];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = target[colon + 1..].strip_prefix(b"//")?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    Some(AbsoluteTarget {
        authority: &rest[..end],
        path: &rest[end..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ows_is_space_and_tab_only() {
        assert_eq!(trim_ows(b" \t5\t "), b"5");
        assert_eq!(trim_ows(b"\xc2\xa05"), b"\xc2\xa05");
        assert_eq!(trim_ows(b"\x0b5"), b"\x0b5");
        assert_eq!(trim_ows(b"   "), b"");
    }

    #[test]
    fn content_length_forms() {
        let parse = |values: &[&[u8]]| {
            let mut cl = ContentLength::default();
            values.iter().try_for_each(|v| cl.add(v)).map(|()| cl.get())
        };
        assert_eq!(parse(&[b"3"]), Ok(Some(3)));
        assert_eq!(parse(&[b" 3\t"]), Ok(Some(3)));
        assert_eq!(parse(&[b"3, 3", b"3"]), Ok(Some(3)));
        assert_eq!(parse(&[b"007"]), Ok(Some(7)));
        for bad in [
            &b"\xa05"[..],
            b"\xc2\xa05",
            b"5\x0b",
            b"+5",
            b"-5",
            b"5 5",
            b"3,4",
            b"3,",
            b"",
            b"0x5",
            b"1234567890123456789",
        ] {
            assert!(
                parse(&[bad]).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse(&[b"3", b"4"]).is_err());
    }

    #[test]
    fn transfer_coding_forms() {
        let parse = |values: &[&[u8]]| {
            let mut te = TransferCodings::default();
            values.iter().try_for_each(|v| te.add(v)).map(|()| te)
        };
        let te = parse(&[b"Chunked"]).expect("ok");
        assert!(te.is_only_chunked());
        assert_eq!(te.names(), b"chunked");
        let te = parse(&[b"gzip ,\tCHUNKED"]).expect("ok");
        assert_eq!(te.codings(), [Coding::Other, Coding::Chunked]);
        assert_eq!(te.names(), b"gzip, chunked");
        assert!(
            !parse(&[b"chunked", b"chunked"])
                .expect("ok")
                .is_only_chunked()
        );
        for bad in [
            &b"\xc2\xa0chunked"[..],
            b"\xa0chunked",
            b"chunked\x0b",
            b"chunked\x00",
            b"chun ked",
            b"\"chunked\"",
            b"",
            b" , ",
        ] {
            assert!(
                parse(&[bad]).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(!parse(&[b"xchunked"]).expect("a token").is_only_chunked());
    }

    #[test]
    fn host_values() {
        for good in [
            &b"example.com"[..],
            b"example.com:8080",
            b"127.0.0.1:80",
            b"[::1]:443",
            b"[::1]",
            b"",
            b"xn--bcher-kva.example",
        ] {
            assert!(
                valid_host(good),
                "{:?} refused",
                String::from_utf8_lossy(good)
            );
        }
        for bad in [
            &b"a b"[..],
            b"a@b",
            b"a/b",
            b"a\xc2\xa0",
            b"host:80x",
            b"host:123456",
            b"[::1",
            b"[::1]x",
            b"a\tb",
        ] {
            assert!(
                !valid_host(bad),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn absolute_targets() {
        let origin = |t: &AbsoluteTarget<'_>| {
            let mut out = Vec::new();
            t.write_origin_form(&mut out);
            out
        };
        let t = absolute_target(b"http://a.example:81/p?q").expect("absolute");
        assert_eq!(
            (t.authority, &origin(&t)[..]),
            (&b"a.example:81"[..], &b"/p?q"[..])
        );
        let t = absolute_target(b"HTTPS://a").expect("absolute");
        assert_eq!((t.authority, &origin(&t)[..]), (&b"a"[..], &b"/"[..]));
        let t = absolute_target(b"http://a?q=1").expect("absolute");
        assert_eq!((t.authority, &origin(&t)[..]), (&b"a"[..], &b"/?q=1"[..]));
        assert_eq!(absolute_target(b"/p"), None);
        assert_eq!(absolute_target(b"ftp://a/"), None);
        assert_eq!(absolute_target(b"*"), None);
    }
}
