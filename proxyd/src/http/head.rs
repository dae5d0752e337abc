//! Parsing request and response heads with httparse, refusing what could smuggle a request,
//! and rewriting them for the other side (hop-by-hop headers, `Connection`): what both
//! parsers share; `request`, `response`, and `lines` (field lookups and edits) hold the rest.

use super::fields::{ContentLength, TransferCodings};

mod lines;
mod request;
mod response;

pub use lines::{edit_fields, request_cookie};
pub use request::{RequestHead, parse_request};
pub use response::{ResponseHead, parse_response, parse_response_to};

/// Largest request or response head (beyond: 431 for requests, 502 for responses).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one head.
pub const MAX_HEADERS: usize = 128;

/// How the end of a message body is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all.
    Empty,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the server closes.
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// Not valid HTTP/1.x, or ambiguous framing.
    Malformed(&'static str),
    /// Valid, but not something this proxy does (a `CONNECT` tunnel).
    Unsupported(&'static str),
}

/// The tokens of every `Connection` field (compare them ignoring ASCII case). Borrowed, as
/// this runs for every message.
fn connection_tokens<'a>(
    headers: &'a [httparse::Header<'a>],
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn has_token(headers: &[httparse::Header<'_>], token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether a field is hop-by-hop and must not be forwarded; `named` says whether the
/// message's `Connection` fields name any field that is not always hop-by-hop anyway.
fn hop_by_hop(name: &str, headers: &[httparse::Header<'_>], named: bool) -> bool {
    const ALWAYS: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
    ];
    if ALWAYS.iter().any(|a| name.eq_ignore_ascii_case(a)) {
        return true;
    }
    // A `Connection` field may name more hop-by-hop fields, but never the framing ones.
    named
        && !["content-length", "transfer-encoding", "host"]
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f))
        && has_token(headers, name)
}

/// Which fields a head has, from one pass, so that the rarer ones cost nothing when absent.
#[derive(Default)]
struct Present {
    hosts: usize,
    content_length: bool,
    transfer_encoding: bool,
    connection: bool,
    upgrade: bool,
    /// A `Connection` token other than `keep-alive` (which is hop-by-hop by itself): a
    /// field it names must be dropped. Usually false, so fields are not checked against it.
    names_fields: bool,
}

impl Present {
    /// Content-Length and Transfer-Encoding codings, each read only when the field is there
    /// (the common head has neither, and pays no second pass).
    fn framing_fields(
        &self,
        headers: &[httparse::Header<'_>],
    ) -> Result<(Option<u64>, Option<TransferCodings>), HeadError> {
        let mut length = ContentLength::default();
        let mut codings = None::<TransferCodings>;
        if self.content_length || self.transfer_encoding {
            for h in headers {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length.add(h.value)?;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    codings.get_or_insert_with(Default::default).add(h.value)?;
                }
            }
        }
        Ok((length.get(), codings))
    }
}

fn present(headers: &[httparse::Header<'_>]) -> Present {
    let mut p = Present::default();
    for h in headers {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            p.hosts += 1;
        } else if n.eq_ignore_ascii_case("content-length") {
            p.content_length = true;
        } else if n.eq_ignore_ascii_case("transfer-encoding") {
            p.transfer_encoding = true;
        } else if n.eq_ignore_ascii_case("connection") {
            p.connection = true;
        } else if n.eq_ignore_ascii_case("upgrade") {
            p.upgrade = true;
        }
    }
    p.names_fields =
        p.connection && connection_tokens(headers).any(|t| !t.eq_ignore_ascii_case(b"keep-alive"));
    p
}

fn is_framing_field(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn push_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_field(out: &mut Vec<u8>, h: &httparse::Header<'_>) {
    out.extend_from_slice(h.name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(h.value);
    out.extend_from_slice(b"\r\n");
}

fn map_parse_error(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooLarge,
        httparse::Error::Version => HeadError::Malformed("unsupported http version"),
        httparse::Error::HeaderName | httparse::Error::HeaderValue => {
            HeadError::Malformed("bad header field")
        }
        _ => HeadError::Malformed("malformed head"),
    }
}
