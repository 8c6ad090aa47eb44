//! One client per upstream registry: builds v2 URLs, answers token and Basic
//! challenges, follows redirects without carrying `Authorization` to another
//! host (and only to addresses [`reach`] allows), enforces timeouts, and
//! classifies failures. It never touches disk.

pub mod auth;
pub mod reach;

use crate::config::UpstreamConfig;
use crate::digest::Digest;
use crate::metrics::{Metrics, UpstreamErrorLabels};
use auth::{Challenge, TokenCache};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LINK, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, StatusCode};
use std::error::Error as _;
use std::time::Duration;

/// Manifests are small; anything bigger is a broken or hostile upstream.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// After a failed connection attempt, requests to that upstream fail fast
/// for this long instead of each waiting out `connect_timeout` again.
const OUTAGE_COOLDOWN: Duration = Duration::from_secs(10);
/// Bounds how many tag pages wharf follows from a paginating upstream.
const MAX_TAG_PAGES: usize = 100;

/// Every manifest type wharf caches, for requests that state no preference.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream refused access ({0})")]
    Denied(String),
    #[error("upstream rate limit (429)")]
    RateLimited { retry_after: Option<String> },
    #[error("upstream answered {0}")]
    Status(u16),
    #[error("cannot reach upstream: {0}")]
    Connect(String),
    #[error("upstream timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("upstream response broke off: {0}")]
    Body(String),
    #[error("upstream sent something invalid: {0}")]
    Protocol(String),
    /// The upstream failed to connect or answer moments ago; asking again
    /// now would only wait out the same timeouts.
    #[error("upstream unavailable ({0}); retrying in a few seconds")]
    Unavailable(String),
    /// Upstream pointed wharf somewhere it may not go (a private address,
    /// a token realm not bound to it).
    #[error("{0}")]
    Refused(String),
}

impl UpstreamError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NotFound => "not_found",
            UpstreamError::Denied(_) => "denied",
            UpstreamError::RateLimited { .. } => "rate_limited",
            UpstreamError::Status(_) => "status",
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Body(_) => "body",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::Unavailable(_) => "unavailable",
            UpstreamError::Refused(_) => "refused",
        }
    }

    /// Failures that say the upstream is unwell rather than that the content
    /// is absent; a stale cached answer is better than an error for these.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Connect(_)
            | UpstreamError::Timeout(_)
            | UpstreamError::RateLimited { .. }
            | UpstreamError::Body(_)
            | UpstreamError::Unavailable(_) => true,
            UpstreamError::Status(code) => *code >= 500,
            UpstreamError::NotFound
            | UpstreamError::Denied(_)
            | UpstreamError::Protocol(_)
            | UpstreamError::Refused(_) => false,
        }
    }
}

/// A manifest fetched whole.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub media_type: String,
    /// What upstream claimed in `Docker-Content-Digest`, if anything.
    pub claimed_digest: Option<Digest>,
}

/// What a HEAD on a manifest said.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

pub struct Upstream {
    pub config: UpstreamConfig,
    http: reqwest::Client,
    tokens: TokenCache,
    metrics: std::sync::Arc<Metrics>,
    /// Until when requests fail fast after a connection failure or
    /// timeout, and why.
    outage: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl Upstream {
    pub fn new(
        config: UpstreamConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Upstream, String> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            // reqwest strips Authorization when a redirect changes host or port.
            .redirect(reach::redirect_policy(&config));
        if let Some(resolver) = reach::resolver(&config) {
            builder = builder.dns_resolver(resolver);
        }
        if config.insecure_skip_verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| e.to_string())?;
        Ok(Upstream {
            config,
            http,
            tokens: TokenCache::default(),
            metrics,
            outage: std::sync::Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The URL of a v2 endpoint. `?ns=` names the registry when the
    /// upstream may be another mirror (see [`UpstreamConfig::passes_ns`]).
    fn url(&self, repo: &str, tail: &str) -> String {
        let base = self.config.url.as_str().trim_end_matches('/');
        match self.config.passes_ns() {
            true => format!("{base}/v2/{repo}/{tail}?ns={}", self.config.name),
            false => format!("{base}/v2/{repo}/{tail}"),
        }
    }

    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let resp = self.send(Method::GET, &url, repo, accept).await?;
        let media_type = header_str(resp.headers(), CONTENT_TYPE.as_str())
            .unwrap_or("application/vnd.docker.distribution.manifest.v2+json")
            .to_owned();
        let claimed_digest = claimed_digest(resp.headers())?;
        let bytes = self.read_capped(resp, MAX_MANIFEST_BYTES).await?;
        Ok(FetchedManifest {
            bytes,
            media_type,
            claimed_digest,
        })
    }

    /// A HEAD that waits at most `patience` for the answer: a caller with
    /// a cached answer to fall back on need not wait out `response_timeout`.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
        accept: &str,
        patience: Duration,
    ) -> Result<ManifestHead, UpstreamError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        let patience = patience.min(self.config.response_timeout);
        let resp = self
            .send_with(Method::HEAD, &url, repo, accept, None, patience)
            .await?;
        Ok(ManifestHead {
            digest: claimed_digest(resp.headers())?,
        })
    }

    /// Starts a blob download, optionally of a byte range; the caller
    /// streams the body.
    pub async fn get_blob(
        &self,
        repo: &str,
        digest: &Digest,
        range: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let range = range.map(|r| (http::header::RANGE, r));
        self.send_with(
            Method::GET,
            &url,
            repo,
            "*/*",
            range,
            self.config.response_timeout,
        )
        .await
    }

    /// The blob's size, if upstream says.
    pub async fn head_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self.send(Method::HEAD, &url, repo, "*/*").await?;
        // Not `content_length()`: a HEAD body is empty, so that reports 0.
        Ok(header_str(resp.headers(), "content-length").and_then(|v| v.parse().ok()))
    }

    /// Every tag, following upstream's own pagination.
    pub async fn list_tags(&self, repo: &str) -> Result<Vec<String>, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct Page {
            tags: Option<Vec<String>>,
        }
        let mut url = self.url(repo, "tags/list");
        let mut tags = Vec::new();
        for _ in 0..MAX_TAG_PAGES {
            let resp = self
                .send(Method::GET, &url, repo, "application/json")
                .await?;
            let next = header_str(resp.headers(), LINK.as_str()).and_then(next_link);
            let body = self.read_capped(resp, MAX_MANIFEST_BYTES).await?;
            let page: Page = serde_json::from_slice(&body)
                .map_err(|e| UpstreamError::Protocol(format!("tag list: {e}")))?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(path) => {
                    url = self
                        .config
                        .url
                        .join(&path)
                        .map_err(|e| UpstreamError::Protocol(format!("Link header: {e}")))?
                        .to_string()
                }
                None => return Ok(tags),
            }
        }
        Ok(tags)
    }

    /// The referrers index for `digest`, as upstream sent it.
    pub async fn get_referrers(
        &self,
        repo: &str,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Bytes, String), UpstreamError> {
        let mut url = self.url(repo, &format!("referrers/{digest}"));
        if let Some(t) = artifact_type {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("artifactType=");
            url.extend(url::form_urlencoded::byte_serialize(t.as_bytes()));
        }
        let resp = self
            .send(
                Method::GET,
                &url,
                repo,
                "application/vnd.oci.image.index.v1+json",
            )
            .await?;
        let media_type = header_str(resp.headers(), CONTENT_TYPE.as_str())
            .unwrap_or("application/vnd.oci.image.index.v1+json")
            .to_owned();
        Ok((
            self.read_capped(resp, MAX_MANIFEST_BYTES).await?,
            media_type,
        ))
    }

    async fn read_capped(
        &self,
        resp: reqwest::Response,
        cap: usize,
    ) -> Result<Bytes, UpstreamError> {
        if resp.content_length().is_some_and(|n| n > cap as u64) {
            return Err(UpstreamError::Protocol(format!(
                "response larger than {cap} bytes"
            )));
        }
        let mut body = BytesMut::new();
        let mut stream = resp.bytes_stream();
        loop {
            match tokio::time::timeout(self.config.read_timeout, stream.next()).await {
                Err(_) => return Err(UpstreamError::Timeout("body data")),
                Ok(None) => return Ok(body.freeze()),
                Ok(Some(Err(e))) => return Err(UpstreamError::Body(error_chain(e))),
                Ok(Some(Ok(chunk))) => {
                    if body.len() + chunk.len() > cap {
                        return Err(UpstreamError::Protocol(format!(
                            "response larger than {cap} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                    self.count_fetched(chunk.len());
                }
            }
        }
    }

    /// Sends a request, answering one authentication challenge if needed.
    /// Only success statuses come back as `Ok`.
    async fn send(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        accept: &str,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.send_with(
            method,
            url,
            repo,
            accept,
            None,
            self.config.response_timeout,
        )
        .await
    }

    async fn send_with(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        accept: &str,
        extra: Option<(http::header::HeaderName, &str)>,
        patience: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        if let Some(reason) = self.recent_outage() {
            return Err(UpstreamError::Unavailable(reason));
        }
        let started = std::time::Instant::now();
        let result = self
            .send_once_authenticated(method, url, repo, accept, extra, patience)
            .await;
        if result.is_ok() {
            *self.outage.lock().expect("outage lock") = None;
        }
        let labels = self.metrics.upstream(&self.config.name);
        self.metrics
            .upstream_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics
                .upstream_errors
                .get_or_create(&UpstreamErrorLabels {
                    upstream: labels.upstream,
                    kind: e.kind(),
                })
                .inc();
        }
        result
    }

    /// The host refused or dropped the connection attempt: fail fast for a
    /// while rather than have every request wait out `connect_timeout`.
    fn note_unreachable(&self, error: &UpstreamError) {
        tracing::warn!(upstream = %self.config.name, %error, "upstream unreachable; failing fast for {}s", OUTAGE_COOLDOWN.as_secs());
        *self.outage.lock().expect("outage lock") = Some((
            std::time::Instant::now() + OUTAGE_COOLDOWN,
            error.to_string(),
        ));
    }

    /// Why requests fail fast right now, if they do.
    fn recent_outage(&self) -> Option<String> {
        let outage = self.outage.lock().expect("outage lock");
        outage
            .as_ref()
            .filter(|(until, _)| std::time::Instant::now() < *until)
            .map(|(_, reason)| reason.clone())
    }

    async fn send_once_authenticated(
        &self,
        method: Method,
        url: &str,
        repo: &str,
        accept: &str,
        extra: Option<(http::header::HeaderName, &str)>,
        patience: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let mut challenged = false;
        loop {
            let mut request = self
                .http
                .request(method.clone(), url)
                .header(ACCEPT, accept);
            if let Some(authorization) = self.tokens.get(&scope) {
                request = request.header(AUTHORIZATION, authorization);
            }
            if let Some((name, value)) = &extra {
                request = request.header(name.clone(), *value);
            }
            let resp = match tokio::time::timeout(patience, request.send()).await {
                Err(_) => return Err(UpstreamError::Timeout("response headers")),
                Ok(Err(e)) if e.is_timeout() => {
                    let error = UpstreamError::Timeout("connection");
                    if e.is_connect() {
                        self.note_unreachable(&error);
                    }
                    return Err(error);
                }
                Ok(Err(e)) => {
                    if let Some(refused) = reach::refusal(&e) {
                        return Err(UpstreamError::Refused(refused.to_string()));
                    }
                    let unreachable = e.is_connect();
                    let error = UpstreamError::Connect(error_chain(e));
                    if unreachable {
                        self.note_unreachable(&error);
                    }
                    return Err(error);
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = header_str(resp.headers(), WWW_AUTHENTICATE.as_str())
                    .and_then(auth::parse_challenge)
                    .ok_or_else(|| {
                        UpstreamError::Denied("401 without a usable challenge".into())
                    })?;
                self.authenticate(challenge, &scope, resp.url()).await?;
                continue;
            }
            return match status {
                s if s.is_success() => Ok(resp),
                StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    Err(UpstreamError::Denied(status.as_u16().to_string()))
                }
                StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::RateLimited {
                    retry_after: header_str(resp.headers(), RETRY_AFTER.as_str())
                        .map(str::to_owned),
                }),
                s => Err(UpstreamError::Status(s.as_u16())),
            };
        }
    }

    /// Answers `challenge`, which `challenger` sent (the upstream, or the
    /// host a redirect led to).
    async fn authenticate(
        &self,
        challenge: Challenge,
        scope: &str,
        challenger: &url::Url,
    ) -> Result<(), UpstreamError> {
        let basic = self.basic_credentials();
        match challenge {
            Challenge::Basic => {
                let value = basic.ok_or_else(|| {
                    UpstreamError::Denied(
                        "Basic auth demanded and no credentials configured".into(),
                    )
                })?;
                // Basic credentials do not expire; an hour bounds a rotated password.
                self.tokens.put(scope, value, Duration::from_secs(3600));
                Ok(())
            }
            Challenge::Bearer {
                realm,
                service,
                scope: challenged_scope,
            } => {
                let mut realm_url = url::Url::parse(&realm)
                    .map_err(|e| UpstreamError::Protocol(format!("token realm {realm:?}: {e}")))?;
                let bound = [&self.config.url, challenger]
                    .iter()
                    .any(|host| auth::realm_is_trusted(host, &realm_url, &self.config.auth_realms));
                if !bound {
                    return Err(UpstreamError::Refused(format!(
                        "token realm {} is not on the upstream's domain; list it in auth_realms to use it",
                        realm_url.host_str().unwrap_or("(no host)")
                    )));
                }
                {
                    let mut q = realm_url.query_pairs_mut();
                    if let Some(service) = &service {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", challenged_scope.as_deref().unwrap_or(scope));
                }
                let mut request = self.http.get(realm_url.clone());
                if let Some(basic) = basic {
                    if auth::realm_is_trusted(
                        &self.config.url,
                        &realm_url,
                        &self.config.auth_realms,
                    ) {
                        request = request.header(AUTHORIZATION, basic);
                    } else {
                        tracing::warn!(
                            upstream = %self.config.name,
                            realm = %realm_url.host_str().unwrap_or(""),
                            "token realm is not trusted for this upstream's credentials; asking anonymously (add it to auth_realms to trust it)"
                        );
                    }
                }
                let resp = match tokio::time::timeout(self.config.response_timeout, request.send())
                    .await
                {
                    Err(_) => return Err(UpstreamError::Timeout("token")),
                    Ok(Err(e)) => {
                        if let Some(refused) = reach::refusal(&e) {
                            return Err(UpstreamError::Refused(format!("token realm: {refused}")));
                        }
                        return Err(UpstreamError::Connect(format!(
                            "token realm: {}",
                            error_chain(e)
                        )));
                    }
                    Ok(Ok(resp)) => resp,
                };
                if !resp.status().is_success() {
                    return Err(UpstreamError::Denied(format!(
                        "token realm answered {}",
                        resp.status().as_u16()
                    )));
                }
                let body = self.read_capped(resp, 1 << 20).await?;
                let answer: auth::TokenAnswer = serde_json::from_slice(&body)
                    .map_err(|e| UpstreamError::Protocol(format!("token answer: {e}")))?;
                let (token, lifetime) = answer
                    .into_token()
                    .ok_or_else(|| UpstreamError::Protocol("token answer has no token".into()))?;
                tracing::debug!(upstream = %self.config.name, scope, "fetched upstream token");
                self.metrics
                    .token_fetches
                    .get_or_create(&self.metrics.upstream(&self.config.name))
                    .inc();
                self.tokens.put(scope, format!("Bearer {token}"), lifetime);
                Ok(())
            }
        }
    }

    fn basic_credentials(&self) -> Option<String> {
        let user = self.config.username.as_ref()?;
        let password = self.config.password.as_deref().unwrap_or("");
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Some(format!("Basic {encoded}"))
    }
}

impl Upstream {
    /// Counts bytes received from this upstream.
    pub fn count_fetched(&self, bytes: usize) {
        self.metrics
            .fetched_bytes
            .get_or_create(&self.metrics.upstream(&self.config.name))
            .inc_by(bytes as u64);
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn claimed_digest(headers: &HeaderMap) -> Result<Option<Digest>, UpstreamError> {
    match header_str(headers, "docker-content-digest") {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|e| UpstreamError::Protocol(format!("Docker-Content-Digest: {e}"))),
    }
}

/// The target of `<…>; rel="next"` in a `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// reqwest's Display hides the cause ("error sending request"); the chain
/// says what actually happened (connection refused, reset, …).
/// The URL is left out: it names upstream internals and repeats the request.
pub(crate) fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_next_link() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
    }

    #[test]
    fn outage_classification() {
        assert!(UpstreamError::Status(503).is_outage());
        assert!(UpstreamError::RateLimited { retry_after: None }.is_outage());
        assert!(!UpstreamError::NotFound.is_outage());
        assert!(!UpstreamError::Status(400).is_outage());
    }
}
