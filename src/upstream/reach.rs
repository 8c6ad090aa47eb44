//! Where an upstream's client may connect, so wharf never becomes a way in
//! to the network it sits on. Redirects are followed only to public
//! addresses, unless the upstream allows private ones (on by default for
//! an upstream that is itself local). Host names are checked after DNS, so
//! a public-looking name that resolves to 10.0.0.1 is refused too. The
//! upstream's own host and the token realms bound to it are exempt: an
//! operator named them.

use crate::config::{is_private_ip, UpstreamConfig};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use url::Url;

/// Redirects followed for one request at most.
const MAX_REDIRECTS: usize = 10;

/// Why a connection target was refused. Kept in the error chain so the
/// upstream client can tell a refusal from an unreachable host.
#[derive(Debug, thiserror::Error)]
#[error("refused to connect to {target}: {reason}")]
pub struct Refused {
    pub target: String,
    pub reason: &'static str,
}

const PRIVATE: &str = "a loopback, private or link-local address, which this upstream may not redirect to (set allow_private_redirects = true on the upstream if it should)";

/// The hosts an upstream's client may reach whatever their address.
#[derive(Clone)]
struct Exempt {
    upstream: Url,
    auth_realms: Vec<String>,
}

impl Exempt {
    fn covers(&self, host: &str) -> bool {
        let Ok(url) = Url::parse(&format!("http://{host}/")) else {
            return false;
        };
        super::auth::realm_is_trusted(&self.upstream, &url, &self.auth_realms)
    }

    /// The upstream itself, on its own port: a registry on 127.0.0.1:5000
    /// does not make 127.0.0.1:6379 reachable.
    fn is_upstream(&self, url: &Url) -> bool {
        url.host_str() == self.upstream.host_str()
            && url.port_or_known_default() == self.upstream.port_or_known_default()
    }
}

/// The redirect policy for `config`'s client.
pub fn redirect_policy(config: &UpstreamConfig) -> reqwest::redirect::Policy {
    let exempt = Exempt {
        upstream: config.url.clone(),
        auth_realms: config.auth_realms.clone(),
    };
    let allow_private = config.allow_private_redirects;
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        let url = attempt.url();
        let literal_ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        // Names are checked when they resolve (see `PublicOnly`).
        let private = literal_ip.is_some_and(is_private_ip);
        if private && !allow_private && !exempt.is_upstream(url) {
            let refused = Refused {
                target: url.host_str().unwrap_or("").to_owned(),
                reason: PRIVATE,
            };
            return attempt.error(refused);
        }
        attempt.follow()
    })
}

/// A DNS resolver that drops private addresses for every host but the
/// exempt ones; `None` when the upstream allows private redirects.
pub fn resolver(config: &UpstreamConfig) -> Option<Arc<PublicOnly>> {
    (!config.allow_private_redirects).then(|| {
        Arc::new(PublicOnly {
            exempt: Exempt {
                upstream: config.url.clone(),
                auth_realms: config.auth_realms.clone(),
            },
        })
    })
}

pub struct PublicOnly {
    exempt: Exempt,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let exempt = self.exempt.covers(&host);
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| exempt || !is_private_ip(a.ip()))
                .collect();
            if usable.is_empty() {
                return Err(Box::new(Refused {
                    target: host,
                    reason: PRIVATE,
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(usable.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal inside a request error, if that is what stopped it.
pub fn refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempts_the_upstream_and_its_realms_only() {
        let exempt = Exempt {
            upstream: Url::parse("https://registry.corp.example").unwrap(),
            auth_realms: vec!["sso.example.net".into()],
        };
        assert!(exempt.covers("registry.corp.example"));
        assert!(exempt.covers("auth.corp.example"));
        assert!(exempt.covers("sso.example.net"));
        assert!(!exempt.covers("evil.example.org"));
        let local = Exempt {
            upstream: Url::parse("http://127.0.0.1:5000").unwrap(),
            auth_realms: vec![],
        };
        assert!(local.is_upstream(&Url::parse("http://127.0.0.1:5000/v2/x").unwrap()));
        assert!(!local.is_upstream(&Url::parse("http://127.0.0.1:6379/").unwrap()));
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        use reqwest::dns::Resolve;
        let mut config = crate::config::Config::from_toml_str("")
            .expect("defaults")
            .upstreams[0]
            .clone();
        config.allow_private_redirects = false;
        let filter = resolver(&config).expect("public upstream filters DNS");
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let error = match filter.resolve(name).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert!(refusal(&*error).is_some(), "{error}");
        config.allow_private_redirects = true;
        assert!(resolver(&config).is_none());
    }

    #[test]
    fn finds_the_refusal_in_an_error_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Refused);
        let e = Outer(Refused {
            target: "10.0.0.1".into(),
            reason: PRIVATE,
        });
        assert_eq!(refusal(&e).map(|r| r.target.as_str()), Some("10.0.0.1"));
        assert!(refusal(&std::io::Error::other("x")).is_none());
    }
}
