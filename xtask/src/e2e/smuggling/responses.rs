//! Response variants for the raw backend: framing fields a lenient proxy may misread, and bytes
//! after a well-framed message that a response splitter hopes the client reads next.

use super::corpus::{Variant, cat};

/// What the raw backend answers to the request for variant `id`.
pub fn all() -> Vec<Variant> {
    let ok = |fields: &[u8], body: &[u8]| cat(&[b"HTTP/1.1 200 OK\r\n", fields, b"\r\n", body]);
    let chunked = b"5\r\nhello\r\n0\r\n\r\n";
    // After a well-framed message: what a response splitter hopes the client reads next.
    let next = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil";
    let with_next = cat(&[chunked, next]);
    let list: Vec<(&str, Vec<u8>)> = vec![
        ("cl/plain", ok(b"Content-Length: 5\r\n", b"hello")),
        ("cl/nbsp-latin1", ok(b"Content-Length: \xa05\r\n", b"hello")),
        (
            "cl/nbsp-utf8",
            ok(b"Content-Length: \xc2\xa05\r\n", b"hello"),
        ),
        (
            "cl/nbsp-utf8-after",
            ok(b"Content-Length: 5\xc2\xa0\r\n", b"hello"),
        ),
        (
            "cl/ideographic-space",
            ok(b"Content-Length: \xe3\x80\x805\r\n", b"hello"),
        ),
        ("cl/plus", ok(b"Content-Length: +5\r\n", b"hello")),
        ("cl/leading-zero", ok(b"Content-Length: 05\r\n", b"hello")),
        ("cl/list-same", ok(b"Content-Length: 5, 5\r\n", b"hello")),
        (
            "cl/list-differ",
            ok(b"Content-Length: 5, 9\r\n", b"helloevil"),
        ),
        (
            "cl/two-fields-differ",
            ok(b"Content-Length: 5\r\nContent-Length: 9\r\n", b"helloevil"),
        ),
        (
            "cl/extra-bytes",
            ok(b"Content-Length: 5\r\n", &cat(&[b"hello", next])),
        ),
        ("cl/hex", ok(b"Content-Length: 0x5\r\n", b"hello")),
        ("te/chunked", ok(b"Transfer-Encoding: chunked\r\n", chunked)),
        (
            "te/chunked-ext",
            ok(
                b"Transfer-Encoding: chunked\r\n",
                b"5;a=b\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "te/nbsp-utf8-then-more",
            ok(b"Transfer-Encoding: \xc2\xa0chunked\r\n", &with_next),
        ),
        (
            "te/nel-then-more",
            ok(b"Transfer-Encoding: \xc2\x85chunked\r\n", &with_next),
        ),
        (
            "te/vt-then-more",
            ok(b"Transfer-Encoding: \x0bchunked\r\n", &with_next),
        ),
        ("te/upper", ok(b"Transfer-Encoding: CHUNKED\r\n", chunked)),
        (
            "te/chunked-twice",
            ok(b"Transfer-Encoding: chunked, chunked\r\n", chunked),
        ),
        (
            "te/gzip-chunked",
            ok(b"Transfer-Encoding: gzip, chunked\r\n", chunked),
        ),
        (
            "te/identity-until-close",
            ok(b"Transfer-Encoding: identity\r\n", &with_next),
        ),
        (
            "te/xchunked-until-close",
            ok(b"Transfer-Encoding: xchunked\r\n", &with_next),
        ),
        (
            "te/and-cl",
            ok(
                b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                chunked,
            ),
        ),
        (
            "chunk/0x-size",
            ok(
                b"Transfer-Encoding: chunked\r\n",
                b"0x5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk/bad-ext",
            ok(
                b"Transfer-Encoding: chunked\r\n",
                b"5 ;/x y\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk/bare-lf",
            ok(b"Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
        ),
        (
            "chunk/overflow",
            ok(
                b"Transfer-Encoding: chunked\r\n",
                b"10000000000000005\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        ("none/until-close", ok(b"", &with_next)),
        (
            "status/no-reason",
            cat(&[b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello"]),
        ),
    ];
    list.into_iter()
        .enumerate()
        .map(|(id, (name, bytes))| Variant {
            id,
            name: name.to_owned(),
            bytes,
        })
        .collect()
}
