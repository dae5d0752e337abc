//! The smuggling corpus: request variants (classic vectors and systematic mutations of framing
//! fields, chunked bodies, request lines and folding), each with a stable name and its own tag,
//! generated the same way on every run so that a failure can be re-sent.

/// Stands for the variant's tag in a template: `/v` and four digits, the same length.
const TAG: &[u8] = b"/vXXXX";
/// Stands for the tag of a request hidden in the variant's body.
const HIDDEN_TAG: &[u8] = b"/hXXXX";

/// One message to send, with a name that says what was mutated.
#[derive(Clone, Debug)]
pub struct Variant {
    pub id: usize,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// `/v0042`: the path prefix that marks the requests of variant 42.
pub fn tag(id: usize) -> String {
    format!("/v{id:04}")
}

/// The variant a target belongs to: the number after the first `/v` (or `/h` for a request
/// that was hidden in a body) followed by four digits.
pub fn find_tag(text: &str, marker: char) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(5)).find_map(|i| {
        let d = &bytes[i + 2..i + 6];
        (bytes[i] == b'/' && bytes[i + 1] == marker as u8 && d.iter().all(u8::is_ascii_digit))
            .then(|| d.iter().fold(0, |n, &b| n * 10 + usize::from(b - b'0')))
    })
}

/// Every tag of one kind in `text` (a connection's raw bytes may hold several).
pub fn all_tags(text: &str, marker: char) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(id) = find_tag(rest, marker) {
        out.push(id);
        let at = rest.find(&format!("/{marker}{id:04}")).unwrap_or(0) + 6;
        rest = &rest[at..];
    }
    out
}

fn replace(template: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(template.len());
    let mut i = 0;
    while i < template.len() {
        if template[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(template[i]);
            i += 1;
        }
    }
    out
}

struct Builder {
    out: Vec<(String, Vec<u8>)>,
}

impl Builder {
    fn add(&mut self, name: impl Into<String>, template: Vec<u8>) {
        self.out.push((name.into(), template));
    }
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A complete request hidden where a backend that misreads the framing would find it.
fn hidden() -> Vec<u8> {
    cat(&[b"GET ", HIDDEN_TAG, b"/hidden HTTP/1.1\r\nHost: x\r\n\r\n"])
}

/// `data` as one chunk and the last chunk.
fn chunk(data: &[u8]) -> Vec<u8> {
    cat(&[
        format!("{:x}\r\n", data.len()).as_bytes(),
        data,
        b"\r\n0\r\n\r\n",
    ])
}

/// A request to `TAG` + `path` with `Host: x`, then `fields` (each a whole line without CRLF).
fn request(method: &str, path: &str, fields: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut v = cat(&[
        method.as_bytes(),
        b" ",
        TAG,
        path.as_bytes(),
        b" HTTP/1.1\r\nHost: x\r\n",
    ]);
    for f in fields {
        v.extend_from_slice(f);
        v.extend_from_slice(b"\r\n");
    }
    v.extend_from_slice(b"\r\n");
    v.extend_from_slice(body);
    v
}

/// Whitespace and look-alikes, by name.
const SPACES: [(&str, &[u8]); 11] = [
    ("sp", b" "),
    ("htab", b"\t"),
    ("vt", b"\x0b"),
    ("ff", b"\x0c"),
    ("nul", b"\x00"),
    ("nbsp-utf8", b"\xc2\xa0"),
    ("nbsp-latin1", b"\xa0"),
    ("nel-utf8", b"\xc2\x85"),
    ("ideographic-space", b"\xe3\x80\x80"),
    ("en-quad", b"\xe2\x80\x80"),
    ("cr", b"\r"),
];

/// Where whitespace goes around a field `name: value`.
fn spaced_fields(name: &[u8], value: &[u8], ws: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mid = value.len() / 2;
    vec![
        ("before-value", cat(&[name, b":", ws, value])),
        ("after-sp-before-value", cat(&[name, b": ", ws, value])),
        ("after-value", cat(&[name, b": ", value, ws])),
        ("before-colon", cat(&[name, ws, b": ", value])),
        (
            "inside-value",
            cat(&[name, b": ", &value[..mid], ws, &value[mid..]]),
        ),
        ("before-name", cat(&[b"X-A: 1\r\n", ws, name, b": ", value])),
    ]
}

/// The request variants, in a fixed order; ids are their positions.
pub fn requests() -> Vec<Variant> {
    let mut b = Builder { out: Vec::new() };
    let hidden = hidden();
    let chunked_hidden = chunk(&hidden);
    let n = hidden.len();

    // The vector every fix must stop: a request hidden in a body framed by a NBSP-prefixed
    // Transfer-Encoding; its chunk-size line doubles as a request line.
    let mut data = b"Host: x\r\n\r\n".to_vec();
    data.resize(0xace, b'A');
    b.add(
        "must-have/nbsp-te-hidden-ace",
        cat(&[
            b"POST ",
            TAG,
            b"/innocent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xc2\xa0chunked\r\n\r\nACE ;/x HTTP/1.1\r\n",
            &data,
            b"\r\n0\r\n\r\n",
        ]),
    );

    for (ws_name, ws) in SPACES {
        for (at, field) in spaced_fields(b"Transfer-Encoding", b"chunked", ws) {
            b.add(
                format!("te-space/{ws_name}/{at}"),
                request("POST", "/", &[&field], &chunked_hidden),
            );
        }
        let len = n.to_string();
        for (at, field) in spaced_fields(b"Content-Length", len.as_bytes(), ws) {
            b.add(
                format!("cl-space/{ws_name}/{at}"),
                request("POST", "/", &[&field], &hidden),
            );
        }
    }

    for (name, field) in [
        ("te-name-lower", &b"transfer-encoding: chunked"[..]),
        ("te-name-upper", b"TRANSFER-ENCODING: chunked"),
        ("te-value-title", b"Transfer-Encoding: Chunked"),
        ("te-value-upper", b"Transfer-Encoding: CHUNKED"),
        ("te-value-mixed", b"Transfer-Encoding: cHuNkEd"),
        ("te-name-underscore", b"Transfer_Encoding: chunked"),
        ("te-name-dotless-i", b"Transfer-Encod\xc4\xb1ng: chunked"),
    ] {
        b.add(
            format!("case/{name}"),
            request("POST", "/", &[field], &chunked_hidden),
        );
    }
    for (name, field) in [
        ("cl-name-lower", format!("content-length: {n}")),
        ("cl-name-upper", format!("CONTENT-LENGTH: {n}")),
    ] {
        b.add(
            format!("case/{name}"),
            request("POST", "/", &[field.as_bytes()], &hidden),
        );
    }
    b.add(
        "case/cl-name-cyrillic-e",
        request(
            "POST",
            "/",
            &[format!("Cont\u{435}nt-Length: {n}").as_bytes()],
            &hidden,
        ),
    );

    for (name, value) in [
        ("chunked", &b"chunked"[..]),
        ("sp-chunked", b" chunked"),
        ("chunked-chunked", b"chunked, chunked"),
        ("gzip-chunked", b"gzip, chunked"),
        ("deflate-chunked", b"deflate,chunked"),
        ("identity", b"identity"),
        ("identity-chunked", b"identity, chunked"),
        ("chunked-identity", b"chunked, identity"),
        ("xchunked", b"xchunked"),
        ("x-chunked", b"x-chunked"),
        ("chunk", b"chunk"),
        ("chunked-nul", b"chunked\x00"),
        ("chunked-param", b"chunked;q=1"),
        ("comma-chunked", b", chunked"),
        ("chunked-comma", b"chunked,"),
        ("quoted", b"\"chunked\""),
        ("empty", b""),
    ] {
        let field = cat(&[b"Transfer-Encoding: ", value]);
        b.add(
            format!("te-form/{name}"),
            request("POST", "/", &[&field], &chunked_hidden),
        );
    }
    for (name, first, second) in [
        ("two-fields-chunked-identity", "chunked", "identity"),
        ("two-fields-gzip-chunked", "gzip", "chunked"),
        ("two-fields-chunked-chunked", "chunked", "chunked"),
        ("two-fields-empty-chunked", "", "chunked"),
    ] {
        let f1 = format!("Transfer-Encoding: {first}");
        let f2 = format!("Transfer-Encoding: {second}");
        b.add(
            format!("te-form/{name}"),
            request(
                "POST",
                "/",
                &[f1.as_bytes(), f2.as_bytes()],
                &chunked_hidden,
            ),
        );
    }

    let wrapped = (u128::from(u64::MAX) + 1 + n as u128).to_string();
    let arabic: String = n
        .to_string()
        .chars()
        .map(|c| char::from_u32(0x660 + c.to_digit(10).unwrap_or(0)).unwrap_or('?'))
        .collect();
    let fullwidth: String = n
        .to_string()
        .chars()
        .map(|c| char::from_u32(0xff10 + c.to_digit(10).unwrap_or(0)).unwrap_or('?'))
        .collect();
    for (name, value) in [
        ("plain", format!("{n}")),
        ("leading-zero", format!("0{n}")),
        ("leading-zeros", format!("0000000000{n}")),
        ("plus", format!("+{n}")),
        ("minus", format!("-{n}")),
        ("list-same", format!("{n}, {n}")),
        ("list-same-nospace", format!("{n},{n}")),
        ("list-differ", format!("{n}, {}", n + 1)),
        ("list-differ-nospace", format!("{},{n}", n - 1)),
        ("list-trailing-comma", format!("{n},")),
        ("list-leading-comma", format!(",{n}")),
        ("space-separated", format!("{n} {n}")),
        ("decimal-point", format!("{n}.0")),
        ("exponent", format!("{}e1", n / 10)),
        ("hex", format!("0x{n:x}")),
        ("underscore", format!("{}_{}", n / 10, n % 10)),
        ("empty", String::new()),
        ("huge", "99999999999999999999999999".into()),
        ("u64-wrap", wrapped),
        ("arabic-indic-digits", arabic),
        ("fullwidth-digits", fullwidth),
    ] {
        let field = format!("Content-Length: {value}");
        b.add(
            format!("cl-form/{name}"),
            request("POST", "/", &[field.as_bytes()], &hidden),
        );
    }
    for (name, first, second) in [
        ("two-fields-same", n, n),
        ("two-fields-differ", n, n + 1),
        ("two-fields-zero-first", 0, n),
    ] {
        let f1 = format!("Content-Length: {first}");
        let f2 = format!("Content-Length: {second}");
        b.add(
            format!("cl-form/{name}"),
            request("POST", "/", &[f1.as_bytes(), f2.as_bytes()], &hidden),
        );
    }

    // CL and TE together: TE wins for a strict reader; a CL reader finds the hidden request.
    let cl_te_body = chunked_hidden.clone();
    let cl_all = format!("Content-Length: {}", cl_te_body.len());
    let short_cl = format!("Content-Length: {}", format!("{:x}\r\n", n).len());
    for (name, fields) in [
        (
            "cl-then-te",
            vec![cl_all.as_bytes(), b"Transfer-Encoding: chunked"],
        ),
        (
            "te-then-cl",
            vec![b"Transfer-Encoding: chunked", cl_all.as_bytes()],
        ),
        (
            "te-cl-short",
            vec![short_cl.as_bytes(), b"Transfer-Encoding: chunked"],
        ),
        (
            "te-cl-zero",
            vec![b"Content-Length: 0", b"Transfer-Encoding: chunked"],
        ),
        (
            "nbsp-te-cl",
            vec![short_cl.as_bytes(), b"Transfer-Encoding: \xc2\xa0chunked"],
        ),
        (
            "identity-te-cl",
            vec![short_cl.as_bytes(), b"Transfer-Encoding: identity"],
        ),
        (
            "folded-te-cl",
            vec![short_cl.as_bytes(), b"Transfer-Encoding:\r\n chunked"],
        ),
    ] {
        b.add(
            format!("cl-te/{name}"),
            request("POST", "/", &fields, &cl_te_body),
        );
    }

    let te = [&b"Transfer-Encoding: chunked"[..]];
    let size_line =
        |line: &[u8], data: &[u8]| -> Vec<u8> { cat(&[line, b"\r\n", data, b"\r\n0\r\n\r\n"]) };
    let nx = format!("{n:x}");
    let nxu = nx.to_uppercase();
    for (name, line) in [
        ("lower-hex", nx.clone()),
        ("upper-hex", nxu.clone()),
        ("leading-zero", format!("0{nx}")),
        (
            "leading-zeros-23",
            format!("{}{nx}", "0".repeat(23 - nx.len())),
        ),
        ("0x-prefix", format!("0x{nx}")),
        ("negative", format!("-{nx}")),
        ("plus", format!("+{nx}")),
        ("leading-space", format!(" {nx}")),
        ("trailing-space", format!("{nx} ")),
        ("trailing-tab", format!("{nx}\t")),
        (
            "overflow-wraps",
            format!("1{}{nx}", "0".repeat(16 - nx.len())),
        ),
        ("overflow-long", format!("{}{nx}", "f".repeat(20))),
        ("too-small", format!("{:x}", n - 1)),
        ("too-large", format!("{:x}", n + 1)),
    ] {
        b.add(
            format!("chunk-size/{name}"),
            request("POST", "/", &te, &size_line(line.as_bytes(), &hidden)),
        );
    }
    b.add(
        "chunk-size/nul-suffix",
        request(
            "POST",
            "/",
            &te,
            &size_line(&cat(&[nx.as_bytes(), b"\x00"]), &hidden),
        ),
    );

    for (name, ext) in [
        ("token", &b";a=b"[..]),
        ("name-only", b";a"),
        ("space-before-semicolon", b" ;a=b"),
        ("space-after-semicolon", b"; a=b"),
        ("tab-before-semicolon", b"\t;a=b"),
        ("spaces-around-equals", b";a = b"),
        ("quoted", b";a=\"b c\""),
        ("quoted-escape", b";a=\"b\\\"c\""),
        ("two", b";a=b;c=d"),
        ("semicolon-only", b";"),
        ("semicolon-space", b"; "),
        ("space-in-value", b";a=b c"),
        ("nul", b";a\x00"),
        ("bare-lf", b";a\nb"),
        ("bare-cr", b";a\rb"),
        ("unterminated-quote", b";a=\"b"),
        ("no-name", b";=b"),
        ("nbsp-value", b";a=b\xc2\xa0"),
        ("request-line", b" ;/x HTTP/1.1"),
    ] {
        let line = cat(&[nx.as_bytes(), ext]);
        b.add(
            format!("chunk-ext/{name}"),
            request("POST", "/", &te, &size_line(&line, &hidden)),
        );
    }
    let long = cat(&[nx.as_bytes(), b";a=", &[b'x'; 3000]]);
    b.add(
        "chunk-ext/long-3000",
        request("POST", "/", &te, &size_line(&long, &hidden)),
    );
    for (name, last) in [
        ("last-token", &b"0;a=b"[..]),
        ("last-space", b"0 ;a"),
        ("last-bad", b"0;/x y"),
    ] {
        let body = cat(&[nx.as_bytes(), b"\r\n", &hidden, b"\r\n", last, b"\r\n\r\n"]);
        b.add(
            format!("chunk-ext/{name}"),
            request("POST", "/", &te, &body),
        );
    }

    for (name, trailers) in [
        ("valid", &b"X-T: 1\r\n"[..]),
        ("two", b"X-T: 1\r\nX-U: 2\r\n"),
        ("no-colon", b"X-T 1\r\n"),
        ("nul", b"X-T: \x00\r\n"),
        ("folded", b"X-T: 1\r\n more\r\n"),
        ("content-length", b"Content-Length: 50\r\n"),
        ("transfer-encoding", b"Transfer-Encoding: chunked\r\n"),
        ("host", b"Host: evil\r\n"),
        ("bare-lf", b"X-T: 1\n"),
        ("space-before-colon", b"X-T : 1\r\n"),
    ] {
        let body = cat(&[
            format!("{nx}\r\n").as_bytes(),
            &hidden,
            b"\r\n0\r\n",
            trailers,
            b"\r\n",
        ]);
        b.add(format!("trailer/{name}"), request("POST", "/", &te, &body));
    }

    let line = |s: &[u8]| cat(&[s, b"\r\n"]);
    let get = |start: &[u8], fields: &[u8]| cat(&[start, b"\r\n", fields, b"\r\n"]);
    for (name, bytes) in [
        (
            "absolute-other-host",
            get(
                &cat(&[b"GET http://evil", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "absolute-same-host",
            get(&cat(&[b"GET http://x", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "absolute-other-port",
            get(
                &cat(&[b"GET http://x:81", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "absolute-https-other",
            get(
                &cat(&[b"GET https://evil", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "absolute-upper-scheme",
            get(
                &cat(&[b"GET HTTP://evil", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "absolute-userinfo",
            get(
                &cat(&[b"GET http://x@evil", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "absolute-no-host",
            get(&cat(&[b"GET http://evil", TAG, b"/ HTTP/1.1"]), b""),
        ),
        (
            "missing-host",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b""),
        ),
        (
            "two-hosts-same",
            get(
                &cat(&[b"GET ", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\nHost: x\r\n",
            ),
        ),
        (
            "two-hosts-differ",
            get(
                &cat(&[b"GET ", TAG, b"/ HTTP/1.1"]),
                b"Host: x\r\nHost: evil\r\n",
            ),
        ),
        (
            "empty-host",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b"Host:\r\n"),
        ),
        (
            "host-ows",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b"Host:  x \r\n"),
        ),
        (
            "host-nbsp",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b"Host: \xc2\xa0x\r\n"),
        ),
        (
            "host-space-inside",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b"Host: x evil\r\n"),
        ),
        (
            "http10-no-host",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.0"]), b""),
        ),
        (
            "http10-host",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.0"]), b"Host: x\r\n"),
        ),
        (
            "lowercase-method",
            get(&cat(&[b"get ", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "extension-method",
            get(&cat(&[b"PURGE ", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "nul-in-method",
            get(&cat(&[b"G\x00ET ", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "tab-after-method",
            get(&cat(&[b"GET\t", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "two-spaces-after-method",
            get(&cat(&[b"GET  ", TAG, b"/ HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "space-after-version",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1 "]), b"Host: x\r\n"),
        ),
        (
            "space-in-target",
            get(&cat(&[b"GET ", TAG, b"/a b HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "tab-in-target",
            get(&cat(&[b"GET ", TAG, b"/a\tb HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "nbsp-in-target",
            get(
                &cat(&[b"GET ", TAG, b"/a\xc2\xa0b HTTP/1.1"]),
                b"Host: x\r\n",
            ),
        ),
        (
            "utf8-in-target",
            get(&cat(&[b"GET ", TAG, b"/\xc3\xa9 HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "percent-dots",
            get(&cat(&[b"GET ", TAG, b"/%2e%2e/a HTTP/1.1"]), b"Host: x\r\n"),
        ),
        (
            "lowercase-version",
            get(&cat(&[b"GET ", TAG, b"/ http/1.1"]), b"Host: x\r\n"),
        ),
        (
            "version-1-2",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.2"]), b"Host: x\r\n"),
        ),
        (
            "version-2-0",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/2.0"]), b"Host: x\r\n"),
        ),
        (
            "bare-cr-in-field",
            get(&cat(&[b"GET ", TAG, b"/ HTTP/1.1"]), b"Host: x\rX: 1\r\n"),
        ),
    ] {
        b.add(format!("request-line/{name}"), bytes);
    }
    let te_10 = cat(&[
        b"POST ",
        TAG,
        b"/ HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        &chunked_hidden,
    ]);
    b.add("request-line/http10-te", te_10);
    let te_cl_10 = cat(&[
        b"POST ",
        TAG,
        b"/ HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n",
        line(format!("Content-Length: {}", chunked_hidden.len()).as_bytes()).as_slice(),
        b"\r\n",
        &chunked_hidden,
    ]);
    b.add("request-line/http10-te-cl", te_cl_10);
    let lf = |s: Vec<u8>| replace(&s, b"\r\n", b"\n");
    let cl = format!("Content-Length: {n}");
    b.add("bare-lf/get", lf(request("GET", "/", &[b"X-A: 1"], b"")));
    b.add(
        "bare-lf/post-cl",
        cat(&[&lf(request("POST", "/", &[cl.as_bytes()], b"")), &hidden]),
    );
    b.add(
        "bare-lf/post-chunked-head",
        cat(&[&lf(request("POST", "/", &te, b"")), &chunked_hidden]),
    );
    b.add(
        "bare-lf/request-line-only",
        cat(&[b"GET ", TAG, b"/ HTTP/1.1\nHost: x\r\n\r\n"]),
    );
    b.add(
        "bare-lf/blank-line-only",
        cat(&[b"GET ", TAG, b"/ HTTP/1.1\r\nHost: x\r\n\n"]),
    );

    for (name, fields) in [
        ("other-field-sp", vec![&b"X-F: a\r\n b"[..]]),
        ("other-field-htab", vec![b"X-F: a\r\n\tb"]),
        ("te-value", vec![b"Transfer-Encoding:\r\n chunked"]),
        ("te-list", vec![b"Transfer-Encoding: gzip,\r\n chunked"]),
    ] {
        b.add(
            format!("obs-fold/{name}"),
            request("POST", "/", &fields, &chunked_hidden),
        );
    }
    b.add(
        "obs-fold/content-length",
        request(
            "POST",
            "/",
            &[format!("Content-Length:\r\n {n}").as_bytes()],
            &hidden,
        ),
    );
    b.add(
        "obs-fold/host-continued",
        cat(&[b"GET ", TAG, b"/ HTTP/1.1\r\nHost: x\r\n evil\r\n\r\n"]),
    );
    b.add(
        "obs-fold/first-field",
        cat(&[b"GET ", TAG, b"/ HTTP/1.1\r\n X: 1\r\nHost: x\r\n\r\n"]),
    );

    let cl_hidden = format!("Content-Length: {n}");
    let two_chunks = cat(&[
        format!("{:x}\r\n", n / 2).as_bytes(),
        &hidden[..n / 2],
        format!("\r\n{:x}\r\n", n - n / 2).as_bytes(),
        &hidden[n / 2..],
        b"\r\n0\r\n\r\n",
    ]);
    let double = cat(&[&hidden, &hidden]);
    let cl_double = format!("Content-Length: {}", double.len());
    for (name, bytes) in [
        (
            "cl-post",
            request("POST", "/", &[cl_hidden.as_bytes()], &hidden),
        ),
        (
            "cl-get",
            request("GET", "/", &[cl_hidden.as_bytes()], &hidden),
        ),
        (
            "cl-two-requests",
            request("POST", "/", &[cl_double.as_bytes()], &double),
        ),
        (
            "chunked-one-chunk",
            request("POST", "/", &te, &chunked_hidden),
        ),
        ("chunked-split", request("POST", "/", &te, &two_chunks)),
        ("chunked-get", request("GET", "/", &te, &chunked_hidden)),
    ] {
        b.add(format!("hidden-in-body/{name}"), bytes);
    }

    b.out
        .into_iter()
        .enumerate()
        .map(|(id, (name, template))| {
            let t = tag(id);
            let h = format!("/h{id:04}");
            let bytes = replace(
                &replace(&template, TAG, t.as_bytes()),
                HIDDEN_TAG,
                h.as_bytes(),
            );
            Variant { id, name, bytes }
        })
        .collect()
}

/// A byte string as Rust would write it, to print a variant so that it can be sent again.
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::super::strict;
    use super::*;

    #[test]
    fn corpus_is_large_unique_and_complete() {
        let v = requests();
        assert!(v.len() >= 200, "only {} request variants", v.len());
        let names: std::collections::HashSet<_> = v.iter().map(|v| &v.name).collect();
        assert_eq!(names.len(), v.len(), "duplicate variant names");
        for r in &v {
            let text = String::from_utf8_lossy(&r.bytes);
            assert_eq!(find_tag(&text, 'v'), Some(r.id), "{}", r.name);
            assert!(!text.contains("XXXX"), "{}", r.name);
            // Every variant is whole: the strict reading never waits for more.
            assert_ne!(
                strict::request(&r.bytes).err(),
                Some(strict::Error::Incomplete),
                "{} is incomplete",
                r.name
            );
        }
        // Both kinds are there: the corpus is not all refusals or all valid.
        let valid = v
            .iter()
            .filter(|r| strict::request(&r.bytes).is_ok())
            .count();
        assert!(
            valid > 40 && valid < v.len() - 40,
            "{valid} valid of {}",
            v.len()
        );
    }

    #[test]
    fn the_must_have_vector_is_exact() {
        let v = &requests()[0];
        let text = String::from_utf8_lossy(&v.bytes);
        assert!(
            text.starts_with("POST /v0000/innocent HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ")
        );
        let body_at = v
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head")
            + 4;
        let body = &v.bytes[body_at..];
        assert!(body.starts_with(b"ACE ;/x HTTP/1.1\r\nHost: x\r\n\r\nAAA"));
        assert_eq!(
            body.len(),
            "ACE ;/x HTTP/1.1\r\n".len() + 0xace + "\r\n0\r\n\r\n".len()
        );
    }

    #[test]
    fn tags_are_found() {
        assert_eq!(find_tag("http://evil/v0012/x", 'v'), Some(12));
        assert_eq!(find_tag("/h0003/hidden", 'v'), None);
        assert_eq!(all_tags("/v0001/a /v0002/ /vx /v0003", 'v'), vec![1, 2, 3]);
    }
}
