//! One check per fuzz target: feed the input to wharf's real parser and
//! assert what must hold for any input. Shared by the cargo-fuzz targets
//! (fuzz/fuzz_targets/*.rs) and by tests/fuzz_seeds.rs, which replays the
//! committed seed corpus on stable Rust. A check panics when an invariant
//! breaks; it never returns an error.

// Each fuzz target uses one check; the seed test uses them all.
#![allow(dead_code)]

use std::sync::OnceLock;
use wharf::api::range::{parse_range, RangeAnswer};
use wharf::api::route::{self, Endpoint, Reference};
use wharf::config::UpstreamConfig;
use wharf::digest::{Algorithm, Digest};
use wharf::upstream::auth::{parse_challenge, Challenge};

/// The longest repository name `route::parse` may accept.
const MAX_NAME_LEN: usize = 255;

fn upstreams() -> &'static [UpstreamConfig] {
    static UPSTREAMS: OnceLock<Vec<UpstreamConfig>> = OnceLock::new();
    UPSTREAMS.get_or_init(|| wharf::Config::defaults().upstreams)
}

/// A digest prints as `algo:hex` in canonical form and parses back equal.
fn check_digest_round_trip(digest: &Digest) {
    let text = digest.to_string();
    let again: Digest = text
        .parse()
        .unwrap_or_else(|e| panic!("{text:?} does not parse back: {e}"));
    assert_eq!(&again, digest, "{text:?} parsed back different");
    let hex_len = match digest.algorithm() {
        Algorithm::Sha256 => 64,
        Algorithm::Sha512 => 128,
    };
    assert_eq!(digest.hex().len(), hex_len, "{text:?}");
    assert!(
        is_lower_hex(digest.hex()),
        "{text:?} has a non-lowercase-hex byte"
    );
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A repository name that reached an endpoint is safe to build paths from.
fn check_name(name: &str) {
    assert!(!name.contains(".."), "name {name:?} contains ..");
    assert!(!name.starts_with('/'), "name {name:?} starts with /");
    assert!(name.len() <= MAX_NAME_LEN, "name of {} bytes", name.len());
    check_repo_grammar(name);
}

/// Every component is `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: no empty
/// component, no dot segment, nothing outside `[a-z0-9._/-]`.
fn check_repo_grammar(name: &str) {
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b)),
        "name {name:?} has a byte outside [a-z0-9._/-]"
    );
    for component in name.split('/') {
        assert!(
            route::is_valid_name_component(component),
            "name {name:?} has component {component:?}"
        );
    }
}

/// Route input: the first byte picks the method (`G`, `H`, `P`, `D` for
/// GET, HEAD, PUT, DELETE; any other byte by its value mod 4), the rest is
/// the request target, split at the first `?` into path and query.
pub fn route(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = match selector {
        b'G' => http::Method::GET,
        b'H' => http::Method::HEAD,
        b'P' => http::Method::PUT,
        b'D' => http::Method::DELETE,
        other => match other % 4 {
            0 => http::Method::GET,
            1 => http::Method::HEAD,
            2 => http::Method::PUT,
            _ => http::Method::DELETE,
        },
    };
    let target = String::from_utf8_lossy(rest);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (&*target, None),
    };
    let parsed = route::parse(&method, path, query);
    let route = match parsed {
        Ok(route) => route,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        method == http::Method::GET || method == http::Method::HEAD,
        "{method} {target:?} was accepted"
    );
    assert_eq!(route.head, method == http::Method::HEAD);
    let _ = route.endpoint.describe();
    let name = match &route.endpoint {
        Endpoint::Base => return,
        Endpoint::Manifest { name, reference } => {
            match reference {
                Reference::Digest(d) => check_digest_round_trip(d),
                Reference::Tag(tag) => {
                    assert!(route::is_valid_tag(tag), "tag {tag:?}");
                    assert!(tag.len() <= 128, "tag of {} bytes", tag.len());
                    assert!(!tag.starts_with('.') && !tag.contains('/'), "tag {tag:?}");
                }
            }
            name
        }
        Endpoint::Blob { name, digest } | Endpoint::Referrers { name, digest, .. } => {
            check_digest_round_trip(digest);
            name
        }
        Endpoint::TagsList { name, last, .. } => {
            if let Some(last) = last {
                assert!(route::is_valid_tag(last), "last {last:?}");
            }
            name
        }
    };
    check_name(name);
    let ns = route.ns.as_deref();
    match route::select_upstream(upstreams(), ns, name) {
        Ok((upstream, repo)) => {
            if let Some(ns) = ns {
                assert_eq!(upstream.name, ns, "?ns= was not honoured");
            }
            // The repository asked of upstream is the client's name less a
            // registry prefix, maybe with `library/`: still a valid name.
            check_repo_grammar(&repo);
            assert!(!repo.contains("..") && !repo.starts_with('/'), "{repo:?}");
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(ns.is_some(), "no ?ns= but {name:?} was refused: {e}");
        }
    }
}

/// `WWW-Authenticate` input: the whole input is the header value.
pub fn www_authenticate(data: &[u8]) {
    let header = String::from_utf8_lossy(data);
    let Some(challenge) = parse_challenge(&header) else {
        return;
    };
    let Challenge::Bearer {
        realm,
        service,
        scope,
    } = &challenge
    else {
        return;
    };
    // Re-serialise with quoted, escaped values: it must parse back equal.
    let quote = |v: &str| {
        let mut out = String::from("\"");
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    };
    let mut again = format!("Bearer realm={}", quote(realm));
    if let Some(service) = service {
        again += &format!(",service={}", quote(service));
    }
    if let Some(scope) = scope {
        again += &format!(",scope={}", quote(scope));
    }
    assert_eq!(
        parse_challenge(&again).as_ref(),
        Some(&challenge),
        "{header:?} re-serialised as {again:?}"
    );
}

/// Lengths every Range header is checked against, besides one the input
/// may name.
const RANGE_LENS: [u64; 7] = [0, 1, 2, 10, 100, u64::MAX - 1, u64::MAX];

/// Range input: an optional first line with a decimal blob length, then
/// the header value. Every header is also tried against [`RANGE_LENS`].
pub fn range(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (len, header) = match text.split_once('\n') {
        Some((first, rest)) => match first.trim().parse::<u64>() {
            Ok(len) => (Some(len), rest),
            Err(_) => (None, &*text),
        },
        None => (None, &*text),
    };
    for len in len.into_iter().chain(RANGE_LENS) {
        let answer = parse_range(header, len);
        match answer {
            RangeAnswer::Partial { start, end } => {
                assert!(
                    start <= end && end < len,
                    "{header:?} with len {len} gave {answer:?}"
                );
            }
            RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
        }
        if answer != RangeAnswer::Full {
            let spec = header.trim().strip_prefix("bytes=");
            assert!(
                spec.is_some_and(|s| !s.contains(',')),
                "{header:?} with len {len} gave {answer:?}"
            );
        }
    }
}

/// Manifest input: the whole input is the manifest body.
///
/// The parser is lenient on purpose, so there is little to say about which
/// bodies give references: serde_json skips fields wharf does not read
/// without checking their UTF-8 (seed `invalid-utf8-ignored-field.bin`),
/// and a derived struct also reads from a JSON array. What must hold is
/// that every reference is a well-formed digest.
pub fn manifest(data: &[u8]) {
    let refs = wharf::manifest::references(data);
    for (digest, _size) in refs.blobs.iter().chain(&refs.manifests) {
        check_digest_round_trip(digest);
    }
    assert_eq!(wharf::manifest::references(data), refs, "not deterministic");
}

/// Digest input: the whole input is the text to parse.
pub fn digest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // The grammar, written out independently of the parser.
    let expected = match text.split_once(':') {
        Some(("sha256", hex)) => hex.len() == 64 && is_lower_hex(hex),
        Some(("sha512", hex)) => hex.len() == 128 && is_lower_hex(hex),
        _ => false,
    };
    match text.parse::<Digest>() {
        Ok(digest) => {
            assert!(expected, "{text:?} was accepted");
            assert_eq!(digest.to_string(), text, "not canonical");
            check_digest_round_trip(&digest);
        }
        Err(e) => {
            assert!(!expected, "{text:?} was refused: {e}");
            let _ = e.to_string();
        }
    }
}

/// The client's `Authorization` header (src/access): Basic credentials
/// come back exactly as encoded; anything else is anonymous or malformed.
pub fn authorization(data: &[u8]) {
    use base64::Engine as _;
    use wharf::access::{credentials, Credentials};
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, value);
    if let Credentials::Basic { user, password } = credentials(&headers) {
        assert!(!user.is_empty() && !user.contains(':'), "{user:?}");
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let text = String::from_utf8_lossy(data);
        assert!(text.contains(&encoded), "{text:?} decoded to {user:?}");
    }
}
