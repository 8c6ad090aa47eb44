//! Who may pull what, and how much at once: client authentication against
//! an htpasswd file (with a per-address backoff after failed logins), the
//! repository policy, and a bound on requests in flight per client
//! address. Decides only: [`crate::api::error`] turns an [`AccessError`]
//! into a response. Never contacts an upstream, never touches the cache.

pub mod htpasswd;
pub mod policy;

use crate::config::Config;
use base64::Engine as _;
use htpasswd::Htpasswd;
use http::header::{HeaderMap, AUTHORIZATION};
use sha2::Digest as _;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Failed logins an address may make before each further try waits.
const FREE_FAILURES: u32 = 5;
/// The longest an address waits between tries, however many failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long a checked password is trusted without running bcrypt again.
/// Runtimes send credentials with every request; bcrypt costs milliseconds.
const VERIFIED_TTL: Duration = Duration::from_secs(300);
/// Failure records kept before old ones are pruned.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("authentication required")]
    Unauthenticated { realm: String },
    #[error("invalid username or password")]
    BadCredentials { realm: String },
    #[error("too many failed logins from this address; retry in {retry_after}s")]
    LoginBackoff { retry_after: u64 },
    #[error("{0}")]
    Denied(String),
    #[error("more than {limit} requests in flight from this client address; retry shortly")]
    ClientBusy { limit: usize },
}

impl AccessError {
    /// The `wharf_rejected_total` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            AccessError::Unauthenticated { .. } => "unauthenticated",
            AccessError::BadCredentials { .. } => "bad_credentials",
            AccessError::LoginBackoff { .. } => "login_backoff",
            AccessError::Denied(_) => "policy",
            AccessError::ClientBusy { .. } => "client_limit",
        }
    }
}

/// What a request's `Authorization` header offers.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    /// No header, another scheme, or Basic with an empty user name (what
    /// containers/image sends when it has no credentials).
    Anonymous,
    Basic {
        user: String,
        password: String,
    },
    Malformed,
}

/// Reads the client's `Authorization` header; untrusted input.
pub fn credentials(headers: &HeaderMap) -> Credentials {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Credentials::Anonymous;
    };
    let Some(encoded) = value.to_str().ok().and_then(|v| {
        let (scheme, rest) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
    }) else {
        return Credentials::Anonymous;
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    match decoded.as_deref().and_then(|text| text.split_once(':')) {
        Some(("", _)) => Credentials::Anonymous,
        Some((user, password)) => Credentials::Basic {
            user: user.to_owned(),
            password: password.to_owned(),
        },
        None => Credentials::Malformed,
    }
}

struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// How much longer this address must wait before its next try.
    fn wait(&self, now: Instant) -> Option<Duration> {
        let delay = match self.count.checked_sub(FREE_FAILURES) {
            None => return None,
            Some(extra) => Duration::from_secs(1 << extra.min(6)).min(MAX_BACKOFF),
        };
        (self.last + delay).checked_duration_since(now)
    }
}

pub struct Access {
    htpasswd_path: Option<PathBuf>,
    realm: String,
    users: RwLock<Option<Arc<Htpasswd>>>,
    /// sha256(user, password) of recent successful logins → user.
    verified: moka::sync::Cache<[u8; 32], Arc<str>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    policy: policy::Policy,
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client_limit: usize,
}

impl Access {
    /// Reads the htpasswd file, if one is configured.
    pub fn new(config: &Config) -> Result<Access, String> {
        let htpasswd_path = config.auth.htpasswd.clone();
        let users = match &htpasswd_path {
            Some(path) => Some(Arc::new(Htpasswd::load(path)?)),
            None => None,
        };
        if let Some(users) = users.as_ref().filter(|u| u.is_empty()) {
            tracing::warn!(
                users = users.len(),
                "the htpasswd file lists no users: no client can log in"
            );
        }
        Ok(Access {
            htpasswd_path,
            realm: config.auth.realm.clone(),
            users: RwLock::new(users),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_TTL)
                .build(),
            failures: Mutex::new(HashMap::new()),
            policy: policy::Policy::new(config.policy.clone()),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            client_limit: config.limits.client_requests,
        })
    }

    /// Re-reads the htpasswd file (on SIGHUP). On error the old users stay.
    /// Returns how many users the file lists.
    pub fn reload(&self) -> Result<Option<usize>, String> {
        let Some(path) = &self.htpasswd_path else {
            return Ok(None);
        };
        let fresh = Htpasswd::load(path)?;
        let count = fresh.len();
        *self.users.write().expect("users lock") = Some(Arc::new(fresh));
        // A removed user or changed password takes effect now.
        self.verified.invalidate_all();
        Ok(Some(count))
    }

    /// Checks the client's credentials. `required`: the request may not
    /// go on anonymously. Credentials offered are checked even when not
    /// required, so a wrong password is never silently ignored.
    /// Returns the user name, if one logged in.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
        required: bool,
    ) -> Result<Option<Arc<str>>, AccessError> {
        let users = self.users.read().expect("users lock").clone();
        let Some(users) = users else {
            return Ok(None);
        };
        let (user, password) = match credentials(headers) {
            Credentials::Anonymous if !required => return Ok(None),
            Credentials::Anonymous => {
                return Err(AccessError::Unauthenticated {
                    realm: self.realm.clone(),
                })
            }
            Credentials::Malformed => {
                tracing::warn!(%peer, "client login failed: malformed Basic credentials");
                self.note_failure(peer);
                return Err(AccessError::BadCredentials {
                    realm: self.realm.clone(),
                });
            }
            Credentials::Basic { user, password } => (user, password),
        };
        let key: [u8; 32] = sha2::Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if let Some(user) = self.verified.get(&key) {
            return Ok(Some(user));
        }
        if let Some(wait) = self.backoff(peer) {
            // Rounded up: a client that honours Retry-After must not come back early.
            return Err(AccessError::LoginBackoff {
                retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
            });
        }
        let checked_user = user.clone();
        let verdict =
            tokio::task::spawn_blocking(move || users.verify(&checked_user, &password)).await;
        match verdict {
            Ok(Ok(())) => {
                self.failures.lock().expect("failures lock").remove(&peer);
                let user: Arc<str> = user.into();
                self.verified.insert(key, user.clone());
                Ok(Some(user))
            }
            Ok(Err(mismatch)) => {
                let failures = self.note_failure(peer);
                tracing::warn!(%peer, user, reason = mismatch.as_str(), failures, "client login failed");
                Err(AccessError::BadCredentials {
                    realm: self.realm.clone(),
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "password check did not finish");
                Err(AccessError::BadCredentials {
                    realm: self.realm.clone(),
                })
            }
        }
    }

    fn backoff(&self, peer: IpAddr) -> Option<Duration> {
        let failures = self.failures.lock().expect("failures lock");
        failures.get(&peer)?.wait(Instant::now())
    }

    /// Counts a failed login from `peer`; returns its failures in a row.
    fn note_failure(&self, peer: IpAddr) -> u32 {
        let now = Instant::now();
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() >= MAX_TRACKED_ADDRESSES {
            failures.retain(|_, f| now.duration_since(f.last) < MAX_BACKOFF * 10);
        }
        let entry = failures.entry(peer).or_insert(Failures {
            count: 0,
            last: now,
        });
        entry.count += 1;
        entry.last = now;
        entry.count
    }

    /// Whether the pull policy lets `repo` of `upstream` through.
    pub fn check_policy(&self, upstream: &str, repo: &str) -> Result<(), AccessError> {
        self.policy
            .check(upstream, repo)
            .map_err(AccessError::Denied)
    }

    /// Takes one of `peer`'s request slots, for as long as the returned
    /// guard lives (keep it with the response body).
    pub fn admit(&self, peer: IpAddr) -> Result<ClientSlot, AccessError> {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        let count = in_flight.entry(peer).or_insert(0);
        if *count >= self.client_limit {
            return Err(AccessError::ClientBusy {
                limit: self.client_limit,
            });
        }
        *count += 1;
        Ok(ClientSlot {
            in_flight: self.in_flight.clone(),
            peer,
        })
    }
}

/// One request in flight from one client address.
pub struct ClientSlot {
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        if let Some(count) = in_flight.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn basic(user_pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        );
        h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        h
    }

    #[test]
    fn reads_credentials() {
        assert_eq!(credentials(&HeaderMap::new()), Credentials::Anonymous);
        assert_eq!(credentials(&basic(":")), Credentials::Anonymous);
        assert_eq!(
            credentials(&basic("al:pa:ss")),
            Credentials::Basic {
                user: "al".into(),
                password: "pa:ss".into()
            }
        );
        assert_eq!(credentials(&basic("nocolon")), Credentials::Malformed);
        let mut bearer = HeaderMap::new();
        bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(credentials(&bearer), Credentials::Anonymous);
    }

    #[test]
    fn backoff_grows_after_free_failures() {
        let now = Instant::now();
        let f = |count| Failures { count, last: now };
        assert_eq!(f(FREE_FAILURES - 1).wait(now), None);
        assert_eq!(f(FREE_FAILURES).wait(now), Some(Duration::from_secs(1)));
        assert_eq!(f(FREE_FAILURES + 3).wait(now), Some(Duration::from_secs(8)));
        assert_eq!(f(FREE_FAILURES + 40).wait(now), Some(MAX_BACKOFF));
        assert_eq!(f(FREE_FAILURES).wait(now + Duration::from_secs(2)), None);
    }

    #[test]
    fn client_slots_are_returned() {
        let mut config = Config::defaults();
        config.limits.client_requests = 2;
        let access = Access::new(&config).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = access.admit(ip).unwrap();
        let _b = access.admit(ip).unwrap();
        assert!(access.admit(ip).is_err());
        assert!(access.admit("10.0.0.2".parse().unwrap()).is_ok());
        drop(a);
        assert!(access.admit(ip).is_ok());
    }
}
