//! Upstream authentication: parsing `WWW-Authenticate` challenges, fetching
//! Bearer tokens from a realm, and caching them per scope until they expire.
//! Credentials go only to realms this upstream trusts.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use url::Url;

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
/// Returns `None` for schemes wharf does not speak or malformed headers.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params)?;
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `key="value", key=value` pairs; quoted values may contain commas and `\"`.
fn parse_params(text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next() != Some('=') || key.trim().is_empty() {
            return None;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// Whether credentials for `upstream` may be sent to the token realm `realm`.
/// Trusted: the upstream's own host, a host sharing its registrable domain
/// (registry-1.docker.io → auth.docker.io), or one listed in `auth_realms`.
pub fn realm_is_trusted(upstream: &Url, realm: &Url, auth_realms: &[String]) -> bool {
    let (Some(up), Some(realm_host)) = (upstream.host_str(), realm.host_str()) else {
        return false;
    };
    if auth_realms
        .iter()
        .any(|h| h.eq_ignore_ascii_case(realm_host))
        || up == realm_host
    {
        return true;
    }
    let is_ip = |h: &str| h.parse::<std::net::IpAddr>().is_ok();
    let domain = |h: &str| {
        let labels: Vec<&str> = h.rsplitn(3, '.').collect();
        (labels.len() >= 2).then(|| format!("{}.{}", labels[1], labels[0]))
    };
    !is_ip(up) && !is_ip(realm_host) && domain(up).is_some() && domain(up) == domain(realm_host)
}

/// The body of a token endpoint's answer.
#[derive(serde::Deserialize)]
pub struct TokenAnswer {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenAnswer {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The spec's default lifetime is 60 s; renew a little early.
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        Some((token, lifetime.mul_f64(0.9)))
    }
}

/// `Authorization` values per scope, until they expire.
#[derive(Default)]
pub struct TokenCache {
    entries: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let entries = self.entries.lock().expect("token cache lock");
        entries
            .get(scope)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(value, _)| value.clone())
    }

    pub fn put(&self, scope: &str, authorization: String, lifetime: Duration) {
        let mut entries = self.entries.lock().expect("token cache lock");
        let now = Instant::now();
        entries.retain(|_, (_, until)| *until > now);
        entries.insert(scope.to_owned(), (authorization, now + lifetime));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            })
        );
    }

    #[test]
    fn parses_odd_but_legal_forms() {
        let c = parse_challenge(r#"bearer realm=https://r/t, scope="repository:a/b:pull,push""#)
            .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://r/t".into(),
                service: None,
                scope: Some("repository:a/b:pull,push".into())
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
        assert_eq!(parse_challenge("Bearer =x"), None);
    }

    #[test]
    fn trusts_only_related_realms() {
        let hub = Url::parse("https://registry-1.docker.io").unwrap();
        let t = |realm: &str, extra: &[String]| {
            realm_is_trusted(&hub, &Url::parse(realm).unwrap(), extra)
        };
        assert!(t("https://auth.docker.io/token", &[]));
        assert!(!t("https://evil.example/token", &[]));
        assert!(t("https://evil.example/token", &["evil.example".into()]));
        let local = Url::parse("http://127.0.0.1:5000").unwrap();
        assert!(realm_is_trusted(
            &local,
            &Url::parse("http://127.0.0.1:9999/t").unwrap(),
            &[]
        ));
        assert!(!realm_is_trusted(
            &local,
            &Url::parse("http://127.0.0.2/t").unwrap(),
            &[]
        ));
    }

    #[test]
    fn token_lifetime_defaults_to_a_minute() {
        let a = TokenAnswer {
            token: None,
            access_token: Some("t".into()),
            expires_in: None,
        };
        let (token, lifetime) = a.into_token().unwrap();
        assert_eq!(token, "t");
        assert_eq!(lifetime, Duration::from_secs(54));
        assert!(TokenAnswer {
            token: Some(String::new()),
            access_token: None,
            expires_in: None
        }
        .into_token()
        .is_none());
    }
}
