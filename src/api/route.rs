//! Pure request parsing: method, path and query become a typed [`Endpoint`],
//! and a repository name plus `?ns=` become an upstream choice. Every name,
//! tag and digest is checked against its grammar here, before anything
//! builds a path or a URL from it. No I/O, no state.

use crate::config::UpstreamConfig;
use crate::digest::{Digest, DigestError};
use http::Method;

/// A manifest reference: a tag, or a digest (immutable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`: the version check clients ping first.
    Base,
    Manifest {
        name: String,
        reference: Reference,
    },
    Blob {
        name: String,
        digest: Digest,
    },
    TagsList {
        name: String,
        n: Option<usize>,
        last: Option<String>,
    },
    Referrers {
        name: String,
        digest: Digest,
        artifact_type: Option<String>,
    },
}

impl Endpoint {
    /// The repository the endpoint is about; none for the version check.
    pub fn name(&self) -> Option<&str> {
        match self {
            Endpoint::Base => None,
            Endpoint::Manifest { name, .. }
            | Endpoint::Blob { name, .. }
            | Endpoint::TagsList { name, .. }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }

    /// A metrics label, and the name and reference for the log line.
    pub fn describe(&self) -> (&'static str, String, String) {
        match self {
            Endpoint::Base => ("base", "-".into(), "-".into()),
            Endpoint::Manifest { name, reference } => {
                ("manifest", name.clone(), reference.to_string())
            }
            Endpoint::Blob { name, digest } => ("blob", name.clone(), digest.to_string()),
            Endpoint::TagsList { name, .. } => ("tags", name.clone(), "-".into()),
            Endpoint::Referrers { name, digest, .. } => {
                ("referrers", name.clone(), digest.to_string())
            }
        }
    }
}

/// A parsed request: what is asked for, whether only headers are wanted,
/// and the registry the client named with `?ns=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    pub head: bool,
    pub ns: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such API endpoint")]
    NotFound,
    #[error("{0} is not supported: wharf is a read-only pull-through cache")]
    Unsupported(Method),
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    #[error(transparent)]
    DigestInvalid(#[from] DigestError),
    #[error("invalid query parameter {0}")]
    QueryInvalid(&'static str),
    #[error("{0:?} is not a configured upstream registry")]
    UnknownUpstream(String),
}

const MAX_NAME_LEN: usize = 255;

/// Parses a request line into a [`Route`].
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => {
            return read_only(method).map(|head| Route {
                endpoint: Endpoint::Base,
                head,
                ns: None,
            })
        }
        Some(rest) => rest.strip_prefix('/').ok_or(RouteError::NotFound)?,
        None => return Err(RouteError::NotFound),
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let [name_parts @ .., kind, last] = segments.as_slice() else {
        return Err(RouteError::NotFound);
    };
    if name_parts.is_empty() {
        return Err(RouteError::NotFound);
    }
    // Classify before checking the method, so a write to a real endpoint is
    // a 405 and a write to nonsense is a 404.
    let kind = match (*kind, *last) {
        ("manifests", _) | ("blobs", _) | ("referrers", _) => *kind,
        ("tags", "list") => "tags",
        // Upload endpoints: `blobs/uploads/` and `blobs/uploads/<uuid>`.
        ("uploads", _) => return Err(RouteError::Unsupported(method.clone())),
        _ => return Err(RouteError::NotFound),
    };
    let head = read_only(method)?;
    let name = name_parts.join("/");
    check_name(&name)?;
    let params = Query::parse(query);
    let endpoint = match kind {
        "manifests" => Endpoint::Manifest {
            name,
            reference: parse_reference(last)?,
        },
        "blobs" => Endpoint::Blob {
            name,
            digest: last.parse()?,
        },
        "referrers" => Endpoint::Referrers {
            name,
            digest: last.parse()?,
            artifact_type: params.get("artifactType"),
        },
        _ => Endpoint::TagsList {
            name,
            n: match params.get("n") {
                Some(n) => Some(n.parse().map_err(|_| RouteError::QueryInvalid("n"))?),
                None => None,
            },
            last: match params.get("last") {
                Some(t) if is_valid_tag(&t) => Some(t),
                Some(_) => return Err(RouteError::QueryInvalid("last")),
                None => None,
            },
        },
    };
    Ok(Route {
        endpoint,
        head,
        ns: params.get("ns"),
    })
}

/// GET and HEAD are served; every other method is a write we refuse.
fn read_only(method: &Method) -> Result<bool, RouteError> {
    match *method {
        Method::GET => Ok(false),
        Method::HEAD => Ok(true),
        _ => Err(RouteError::Unsupported(method.clone())),
    }
}

fn parse_reference(text: &str) -> Result<Reference, RouteError> {
    if text.contains(':') {
        Ok(Reference::Digest(text.parse()?))
    } else if is_valid_tag(text) {
        Ok(Reference::Tag(text.to_owned()))
    } else {
        Err(RouteError::TagInvalid(text.chars().take(200).collect()))
    }
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        Query(
            url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

fn check_name(name: &str) -> Result<(), RouteError> {
    if name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_name_component) {
        Ok(())
    } else {
        Err(RouteError::NameInvalid(name.chars().take(300).collect()))
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
pub fn is_valid_name_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[sep_start..i];
        let valid_sep = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !valid_sep {
            return false;
        }
    }
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    let word = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    match bytes.split_first() {
        Some((first, rest)) => {
            word(first)
                && rest.len() <= 127
                && rest.iter().all(|b| word(b) || *b == b'.' || *b == b'-')
        }
        None => false,
    }
}

/// Which upstream serves `name`, and the repository name to ask it for.
///
/// `?ns=` wins; otherwise a leading path component equal to an upstream's
/// name picks it; otherwise the default upstream. A named registry that is
/// not configured is refused, so no request ever reaches an unknown host.
pub fn select_upstream<'a>(
    upstreams: &'a [UpstreamConfig],
    ns: Option<&str>,
    name: &str,
) -> Result<(&'a UpstreamConfig, String), RouteError> {
    let by_name = |n: &str| upstreams.iter().find(|u| u.name == n);
    let (first, rest) = match name.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    let (upstream, repo) = match ns {
        Some(ns) => {
            let upstream = by_name(ns).ok_or_else(|| RouteError::UnknownUpstream(ns.into()))?;
            match rest {
                Some(rest) if first == ns => (upstream, rest),
                _ => (upstream, name),
            }
        }
        None => match (by_name(first), rest) {
            (Some(upstream), Some(rest)) => (upstream, rest),
            _ => (
                upstreams
                    .iter()
                    .find(|u| u.default)
                    .expect("config guarantees a default upstream"),
                name,
            ),
        },
    };
    let repo = if upstream.adds_library_prefix() && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_owned()
    };
    Ok((upstream, repo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn get(path: &str) -> Result<Route, RouteError> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        parse(&Method::GET, path, query)
    }

    #[test]
    fn base_endpoint() {
        assert_eq!(get("/v2/").unwrap().endpoint, Endpoint::Base);
        assert_eq!(get("/v2").unwrap().endpoint, Endpoint::Base);
        assert_eq!(get("/v3/"), Err(RouteError::NotFound));
        assert_eq!(get("/"), Err(RouteError::NotFound));
    }

    #[test]
    fn names_with_many_slashes() {
        let r = get("/v2/a/b/c/d/manifests/v1.2?ns=ghcr.io").unwrap();
        assert_eq!(
            r.endpoint,
            Endpoint::Manifest {
                name: "a/b/c/d".into(),
                reference: Reference::Tag("v1.2".into())
            }
        );
        assert_eq!(r.ns.as_deref(), Some("ghcr.io"));
        // A repository may itself be called "blobs" or "manifests".
        let r = get(&format!("/v2/x/blobs/blobs/{D}")).unwrap();
        assert!(matches!(r.endpoint, Endpoint::Blob { ref name, .. } if name == "x/blobs"));
    }

    #[test]
    fn digests_and_tags_are_validated() {
        assert!(matches!(
            get(&format!("/v2/library/alpine/manifests/{D}"))
                .unwrap()
                .endpoint,
            Endpoint::Manifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
        assert!(matches!(
            get("/v2/a/blobs/sha256:abc"),
            Err(RouteError::DigestInvalid(_))
        ));
        assert!(matches!(
            get("/v2/a/manifests/sha256:abc"),
            Err(RouteError::DigestInvalid(_))
        ));
        assert!(matches!(
            get("/v2/a/manifests/-bad"),
            Err(RouteError::TagInvalid(_))
        ));
        assert!(matches!(
            get(&format!("/v2/a/manifests/{}", "t".repeat(129))),
            Err(RouteError::TagInvalid(_))
        ));
        assert!(get(&format!("/v2/a/manifests/{}", "t".repeat(128))).is_ok());
    }

    #[test]
    fn bad_names_are_rejected_before_use() {
        for path in [
            "/v2/../etc/manifests/latest",
            "/v2/a/../b/manifests/latest",
            "/v2/UPPER/manifests/latest",
            "/v2/a//b/manifests/latest",
            "/v2/a-/manifests/latest",
            "/v2/a%2fb/manifests/latest",
            "/v2/.hidden/manifests/latest",
            "/v2/a___b/manifests/latest",
        ] {
            assert!(
                matches!(get(path), Err(RouteError::NameInvalid(_))),
                "{path} accepted"
            );
        }
        let long = format!("/v2/{}/manifests/latest", "a/".repeat(130) + "a");
        assert!(matches!(get(&long), Err(RouteError::NameInvalid(_))));
        for ok in ["a.b", "a_b", "a__b", "a---b", "0"] {
            assert!(is_valid_name_component(ok), "{ok}");
        }
    }

    #[test]
    fn writes_are_unsupported_and_nonsense_is_not_found() {
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert_eq!(
                parse(&m, "/v2/a/manifests/latest", None),
                Err(RouteError::Unsupported(m.clone()))
            );
            assert_eq!(
                parse(&m, "/v2/a/blobs/uploads/", None),
                Err(RouteError::Unsupported(m.clone()))
            );
            assert_eq!(
                parse(&m, "/v2/a/blobs/uploads/some-uuid", None),
                Err(RouteError::Unsupported(m.clone()))
            );
        }
        assert_eq!(get("/v2/a/things/x"), Err(RouteError::NotFound));
        assert_eq!(get("/v2/manifests/latest"), Err(RouteError::NotFound));
        assert!(
            parse(&Method::HEAD, &format!("/v2/a/blobs/{D}"), None)
                .unwrap()
                .head
        );
    }

    #[test]
    fn tag_list_query() {
        let r = get("/v2/library/alpine/tags/list?n=10&last=3.18").unwrap();
        assert_eq!(
            r.endpoint,
            Endpoint::TagsList {
                name: "library/alpine".into(),
                n: Some(10),
                last: Some("3.18".into())
            }
        );
        assert_eq!(
            get("/v2/a/tags/list?n=ten"),
            Err(RouteError::QueryInvalid("n"))
        );
        assert_eq!(
            get("/v2/a/tags/list?last=%2F"),
            Err(RouteError::QueryInvalid("last"))
        );
    }

    #[test]
    fn upstream_selection() {
        let c = Config::defaults();
        let pick = |ns: Option<&str>, name: &str| {
            select_upstream(&c.upstreams, ns, name).map(|(u, repo)| (u.name.clone(), repo))
        };
        assert_eq!(
            pick(None, "alpine").unwrap(),
            ("docker.io".into(), "library/alpine".into())
        );
        assert_eq!(
            pick(Some("docker.io"), "library/alpine").unwrap().1,
            "library/alpine"
        );
        assert_eq!(
            pick(Some("ghcr.io"), "org/app").unwrap(),
            ("ghcr.io".into(), "org/app".into())
        );
        assert_eq!(
            pick(None, "ghcr.io/org/app").unwrap(),
            ("ghcr.io".into(), "org/app".into())
        );
        assert_eq!(
            pick(Some("ghcr.io"), "ghcr.io/org/app").unwrap().1,
            "org/app"
        );
        assert_eq!(pick(None, "docker.io/alpine").unwrap().1, "library/alpine");
        // A lone component equal to an upstream name is a repository on the default.
        assert_eq!(
            pick(None, "quay.io").unwrap(),
            ("docker.io".into(), "library/quay.io".into())
        );
        assert_eq!(
            pick(Some("evil.example.com"), "x"),
            Err(RouteError::UnknownUpstream("evil.example.com".into()))
        );
    }
}
