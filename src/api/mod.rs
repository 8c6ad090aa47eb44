//! The registry v2 / OCI distribution pull API. A request is parsed by
//! [`route`], answered from [`crate::cache`] or passed to the upstream, and
//! every failure becomes a response in [`error`]. One log line per request.
//! Owns HTTP semantics (headers, Range, HEAD, pagination); never touches
//! files or sockets itself.

pub mod error;
pub mod ops;
pub mod range;
pub mod route;

use crate::access::{Access, ClientSlot};
use crate::cache::{BlobSource, Cache, CacheError, Freshness};
use crate::config::Config;
use crate::digest::Digest;
use crate::metrics::{CacheLabels, Metrics, RequestLabels, ServedLabels};
use crate::upstream::Upstream;
use bytes::Bytes;
use error::{ApiError, Subject};
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use range::{parse_range, RangeAnswer};
use route::{Endpoint, Reference, Route};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

const API_VERSION: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

pub struct Api {
    config: Config,
    upstreams: Vec<Arc<Upstream>>,
    cache: Arc<Cache>,
    access: Arc<Access>,
    metrics: Arc<Metrics>,
}

/// The client's `X-Request-Id` if it is sane, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let given = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()));
    match given {
        Some(id) => id.to_owned(),
        None => {
            // Distinct across restarts without a random number generator.
            let prefix = PREFIX.get_or_init(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32)
            });
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("{prefix:08x}-{n:x}")
        }
    }
}

/// How a request was answered, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Fill,
    Revalidated,
    Stale,
    Pass,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Fill => "fill",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Pass => "pass",
            Outcome::Error => "error",
        }
    }
}

impl Api {
    pub fn new(
        config: Config,
        upstreams: Vec<Arc<Upstream>>,
        cache: Arc<Cache>,
        access: Arc<Access>,
        metrics: Arc<Metrics>,
    ) -> Api {
        Api {
            config,
            upstreams,
            cache,
            access,
            metrics,
        }
    }

    pub fn access(&self) -> &Arc<Access> {
        &self.access
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Answers one request. Never fails: errors become OCI error responses.
    /// Logs one line per request and counts it.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body> {
        let started = Instant::now();
        let (parts, _body) = req.into_parts();
        let request_id = request_id(&parts.headers);
        let peer = parts
            .extensions
            .get::<crate::server::PeerAddr>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
        let route = self.check_size(&parts).and_then(|()| {
            route::parse(&parts.method, parts.uri.path(), parts.uri.query())
                .map_err(ApiError::Route)
        });
        let (endpoint, name, reference) = match &route {
            Ok(route) => route.endpoint.describe(),
            Err(_) => ("invalid", "-".into(), "-".into()),
        };
        let mut upstream_name = None;
        let answer = match (self.access.admit(peer), route) {
            (Err(busy), _) => Err(ApiError::Access(busy)),
            (Ok(_), Err(e)) => Err(e),
            (Ok(slot), Ok(route)) => self
                .answer(route, &parts.headers, peer, &mut upstream_name)
                .await
                .map(|(resp, outcome)| (holding(resp, slot), outcome)),
        };
        let (mut resp, outcome, error) = match answer {
            Ok((resp, outcome)) => (resp, outcome, None),
            Err(e) => {
                if e.is_internal() {
                    tracing::error!(request_id, method = %parts.method, uri = %parts.uri, error = %e, "internal error");
                }
                if let Some(reason) = e.rejection() {
                    self.metrics.reject(reason);
                }
                let message = e.to_string();
                (e.into_response(), Outcome::Error, Some(message))
            }
        };
        if parts.method == Method::HEAD {
            *resp.body_mut() = empty();
        }
        let status = resp.status().as_u16();
        let labels = RequestLabels {
            endpoint,
            method: parts.method.as_str().to_owned(),
            status,
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .request_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Some(upstream) = &upstream_name {
            self.count_cache_result(endpoint, &parts.method, upstream, outcome, &mut resp);
        }
        tracing::info!(
            request_id,
            %peer,
            method = %parts.method,
            name,
            reference,
            upstream = upstream_name.as_deref().unwrap_or("-"),
            status,
            bytes = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-"),
            ms = started.elapsed().as_millis() as u64,
            outcome = outcome.as_str(),
            error = error.as_deref().unwrap_or(""),
            "request"
        );
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("X-Request-Id", v);
        }
        with_api_version(resp)
    }

    /// Counts a hit or miss, and wraps a blob body to count the bytes sent.
    fn count_cache_result(
        &self,
        endpoint: &'static str,
        method: &Method,
        upstream: &str,
        outcome: Outcome,
        resp: &mut Response<Body>,
    ) {
        let hit = match outcome {
            Outcome::Hit | Outcome::Revalidated | Outcome::Stale => true,
            Outcome::Miss | Outcome::Fill => false,
            Outcome::Pass | Outcome::Error => return,
        };
        self.cache.record(hit);
        let kind = if endpoint == "blob" {
            "blob"
        } else {
            "manifest"
        };
        self.metrics
            .cache_results
            .get_or_create(&CacheLabels {
                upstream: upstream.to_owned(),
                kind,
                // A fill is a blob miss, streamed as it arrives.
                result: if hit { outcome.as_str() } else { "miss" },
            })
            .inc();
        if kind == "blob" && *method == Method::GET {
            let served = self
                .metrics
                .served_bytes
                .get_or_create(&ServedLabels {
                    upstream: upstream.to_owned(),
                    source: if hit { "cache" } else { "fill" },
                })
                .clone();
            let body = std::mem::replace(resp.body_mut(), empty());
            *resp.body_mut() = body
                .map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        served.inc_by(data.len() as u64);
                    }
                    frame
                })
                .boxed_unsync();
        }
    }

    /// Refuses request targets and headers beyond the configured limits,
    /// before anything parses them.
    fn check_size(&self, parts: &http::request::Parts) -> Result<(), ApiError> {
        let limits = &self.config.limits;
        let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > limits.max_url_length {
            return Err(ApiError::UrlTooLong {
                limit: limits.max_url_length,
            });
        }
        let header_bytes: usize = parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum();
        if header_bytes > limits.max_header_size {
            return Err(ApiError::HeadersTooLarge {
                limit: limits.max_header_size,
            });
        }
        Ok(())
    }

    /// Whether a request for this upstream (or, for the version check,
    /// the one `?ns=` names or else the default) needs a logged-in client.
    /// Clients such as skopeo and Docker only send credentials after a
    /// challenge on the version check, so it follows the default upstream.
    fn requires_auth(&self, ns: Option<&str>) -> bool {
        let named = ns.and_then(|ns| self.upstreams.iter().find(|u| u.name() == ns));
        match named {
            Some(upstream) => upstream.config.require_auth,
            None => self.config.default_upstream().require_auth,
        }
    }

    /// Authenticates, applies the policy, then answers.
    /// `upstream_name` is set once the request's upstream is known, for logs.
    async fn answer(
        &self,
        route: Route,
        headers: &HeaderMap,
        peer: IpAddr,
        upstream_name: &mut Option<String>,
    ) -> Result<(Response<Body>, Outcome), ApiError> {
        let ns = route.ns.as_deref();
        let target = match route.endpoint.name() {
            Some(name) => Some(self.upstream_for(ns, name, upstream_name)?),
            None => None,
        };
        let required = match &target {
            Some((upstream, _)) => upstream.config.require_auth,
            None => self.requires_auth(ns),
        };
        self.access.authenticate(headers, peer, required).await?;
        let Some((upstream, repo)) = target else {
            return Ok(version_check());
        };
        self.access.check_policy(upstream.name(), &repo)?;
        match route.endpoint {
            Endpoint::Base => Ok(version_check()),
            Endpoint::Manifest { reference, .. } => {
                self.manifest(upstream, &repo, &reference, headers).await
            }
            Endpoint::Blob { digest, .. } => {
                self.blob(upstream, &repo, &digest, route.head, headers)
                    .await
            }
            Endpoint::TagsList { name, n, last } => {
                let tags = upstream
                    .list_tags(&repo)
                    .await
                    .map_err(|e| ApiError::upstream(Subject::Repository, upstream.name(), e))?;
                Ok((tag_page(&name, ns, tags, n, last.as_deref()), Outcome::Pass))
            }
            Endpoint::Referrers {
                digest,
                artifact_type,
                ..
            } => {
                let (bytes, media_type) = upstream
                    .get_referrers(&repo, &digest, artifact_type.as_deref())
                    .await
                    .map_err(|e| ApiError::upstream(Subject::Manifest, upstream.name(), e))?;
                let resp = Response::builder()
                    .header(header::CONTENT_TYPE, media_type)
                    .header(header::CONTENT_LENGTH, bytes.len())
                    .body(full(bytes))
                    .map_err(|_| {
                        ApiError::upstream(
                            Subject::Manifest,
                            upstream.name(),
                            crate::upstream::UpstreamError::Protocol(
                                "unusable Content-Type".into(),
                            ),
                        )
                    })?;
                Ok((resp, Outcome::Pass))
            }
        }
    }

    fn upstream_for(
        &self,
        ns: Option<&str>,
        name: &str,
        upstream_name: &mut Option<String>,
    ) -> Result<(&Arc<Upstream>, String), ApiError> {
        let (config, repo) = route::select_upstream(&self.config.upstreams, ns, name)?;
        let upstream = self
            .upstreams
            .iter()
            .find(|u| u.name() == config.name)
            .expect("one client per configured upstream");
        *upstream_name = Some(upstream.name().to_owned());
        Ok((upstream, repo))
    }

    async fn manifest(
        &self,
        upstream: &Upstream,
        repo: &str,
        reference: &Reference,
        headers: &HeaderMap,
    ) -> Result<(Response<Body>, Outcome), ApiError> {
        let accept = joined_header(headers, header::ACCEPT);
        let (manifest, freshness) = self
            .cache
            .manifest(upstream, repo, reference, accept.as_deref())
            .await
            .map_err(ApiError::cache(Subject::Manifest))?;
        let mut resp = Response::builder()
            .header(header::CONTENT_LENGTH, manifest.bytes.len())
            .header("Docker-Content-Digest", manifest.digest.to_string());
        // A media type that is not a valid header value is served as JSON
        // rather than failing the pull.
        resp = match HeaderValue::from_str(&manifest.media_type) {
            Ok(v) => resp.header(header::CONTENT_TYPE, v),
            Err(_) => resp.header(header::CONTENT_TYPE, "application/json"),
        };
        let outcome = match &freshness {
            Freshness::Hit => Outcome::Hit,
            Freshness::Revalidated => Outcome::Revalidated,
            Freshness::Fetched => Outcome::Miss,
            Freshness::Stale { reason } => {
                tracing::warn!(upstream = upstream.name(), repo, reference = %reference, "{reason}");
                let warning = format!(
                    "110 wharf \"Response is stale: {}\"",
                    reason.replace('"', "'")
                );
                if let Ok(v) = HeaderValue::from_str(&warning) {
                    resp = resp.header(header::WARNING, v);
                }
                Outcome::Stale
            }
        };
        let resp = resp
            .body(full(manifest.bytes.clone()))
            .expect("validated headers");
        Ok((resp, outcome))
    }

    async fn blob(
        &self,
        upstream: &Arc<Upstream>,
        repo: &str,
        digest: &Digest,
        head: bool,
        headers: &HeaderMap,
    ) -> Result<(Response<Body>, Outcome), ApiError> {
        let base = Response::builder()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::ACCEPT_RANGES, "bytes")
            // The digest in the URL is the truth: upstreams may omit it.
            .header("Docker-Content-Digest", digest.to_string());
        if head {
            let len = self
                .cache
                .blob_len(upstream, repo, digest)
                .await
                .map_err(ApiError::cache(Subject::Blob))?;
            let base = match len {
                Some(len) => base.header(header::CONTENT_LENGTH, len),
                None => base,
            };
            return Ok((base.body(empty()).expect("valid headers"), Outcome::Pass));
        }
        let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        if let Some(range) = range_header {
            let in_bucket = self
                .cache
                .bucket_len(upstream, repo, digest)
                .await
                .map_err(ApiError::cache(Subject::Blob))?;
            if let Some(len) = in_bucket {
                match parse_range(range, len) {
                    RangeAnswer::Unsatisfiable => {
                        return Err(ApiError::RangeNotSatisfiable { len })
                    }
                    RangeAnswer::Partial { start, end } => {
                        let body = self
                            .cache
                            .bucket_range(digest, start, end + 1)
                            .await
                            .map_err(ApiError::cache(Subject::Blob))?;
                        let resp = base
                            .status(StatusCode::PARTIAL_CONTENT)
                            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                            .header(header::CONTENT_LENGTH, end - start + 1)
                            .body(stream_body(body))
                            .expect("valid headers");
                        return Ok((resp, Outcome::Hit));
                    }
                    // The whole blob: fill the local cache from the bucket.
                    RangeAnswer::Full => {}
                }
            }
        }
        let mut blob = match self.cache.blob(upstream, repo, digest).await {
            Ok(blob) => blob,
            Err(CacheError::StorageUnavailable(reason)) => {
                tracing::warn!(upstream = upstream.name(), repo, %digest, reason, "disk refuses writes: streaming the blob straight from upstream, uncached");
                return passthrough(base, upstream, repo, digest, range_header).await;
            }
            Err(e) => return Err(ApiError::cache(Subject::Blob)(e)),
        };
        let outcome = match blob.source {
            BlobSource::Hit => Outcome::Hit,
            BlobSource::Fill => Outcome::Fill,
        };
        let range = match range_header {
            Some(range) => {
                let len = blob
                    .total_len()
                    .await
                    .map_err(ApiError::cache(Subject::Blob))?;
                Some((parse_range(range, len), len))
            }
            None => None,
        };
        let resp = match range {
            Some((RangeAnswer::Unsatisfiable, len)) => {
                return Err(ApiError::RangeNotSatisfiable { len })
            }
            Some((RangeAnswer::Partial { start, end }, len)) => base
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_LENGTH, end - start + 1)
                .body(stream_body(blob.stream(start, end + 1))),
            Some((RangeAnswer::Full, _)) | None => match blob.len_if_known() {
                Some(len) => base
                    .header(header::CONTENT_LENGTH, len)
                    .body(stream_body(blob.stream(0, len))),
                // Upstream sent no length: stream until the fill commits.
                None => base.body(stream_body(blob.stream(0, u64::MAX))),
            },
        };
        Ok((resp.expect("valid headers"), outcome))
    }
}

/// `GET /v2/`: the API is here.
fn version_check() -> (Response<Body>, Outcome) {
    let resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(full("{}"))
        .expect("static response");
    (resp, Outcome::Pass)
}

/// Keeps the client's request slot until the response body is done.
fn holding(resp: Response<Body>, slot: ClientSlot) -> Response<Body> {
    resp.map(|body| {
        body.map_frame(move |frame| {
            let _held = &slot;
            frame
        })
        .boxed_unsync()
    })
}

/// Relays a blob from upstream without the store, for when the disk
/// refuses writes. A whole blob is verified on the way: its last chunk is
/// held back until the digest matches. A range is relayed as is; the
/// client checks the whole blob's digest.
async fn passthrough(
    base: http::response::Builder,
    upstream: &Upstream,
    repo: &str,
    digest: &Digest,
    range: Option<&str>,
) -> Result<(Response<Body>, Outcome), ApiError> {
    let resp = upstream
        .get_blob(repo, digest, range)
        .await
        .map_err(|e| ApiError::upstream(Subject::Blob, upstream.name(), e))?;
    let status = resp.status();
    let mut builder = base.status(status);
    for name in [header::CONTENT_LENGTH, header::CONTENT_RANGE] {
        if let Some(value) = resp.headers().get(&name) {
            builder = builder.header(name, value.clone());
        }
    }
    let chunks = resp.bytes_stream().map_err(std::io::Error::other);
    let body = if status == StatusCode::PARTIAL_CONTENT {
        stream_body(chunks)
    } else {
        stream_body(verified(chunks, digest.clone()))
    };
    Ok((builder.body(body).expect("valid headers"), Outcome::Miss))
}

/// Passes `chunks` through, holding each back until the next arrives; the
/// last one goes out only if the whole stream hashes to `digest`.
fn verified(
    chunks: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
    digest: Digest,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use futures_util::StreamExt;
    let verifier = crate::digest::Verifier::new(digest.algorithm());
    futures_util::stream::unfold(Some((chunks, verifier, None::<Bytes>)), move |state| {
        let digest = digest.clone();
        async move {
            let (mut chunks, mut verifier, mut held) = state?;
            loop {
                match chunks.next().await {
                    Some(Ok(chunk)) => {
                        verifier.update(&chunk);
                        if let Some(previous) = held.replace(chunk) {
                            return Some((Ok(previous), Some((chunks, verifier, held))));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        let actual = verifier.finish();
                        if actual != digest {
                            let e = std::io::Error::other(format!(
                                "upstream blob hashes to {actual}, not {digest}"
                            ));
                            return Some((Err(e), None));
                        }
                        return held.map(|last| (Ok(last), None));
                    }
                }
            }
        }
    })
}

fn stream_body(
    stream: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Body {
    StreamBody::new(stream.map_ok(hyper::body::Frame::data)).boxed_unsync()
}

fn with_api_version(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    resp
}

/// All values of a header that clients may repeat (Docker sends one
/// `Accept` per media type), joined as one list.
fn joined_header(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// One page of a tag list, paginated here because some upstreams
/// (distribution 2.8) ignore `n` and `last`.
fn tag_page(
    name: &str,
    ns: Option<&str>,
    mut tags: Vec<String>,
    n: Option<usize>,
    last: Option<&str>,
) -> Response<Body> {
    tags.sort();
    tags.dedup();
    let after: Vec<String> = match last {
        Some(last) => tags.into_iter().filter(|t| t.as_str() > last).collect(),
        None => tags,
    };
    let (page, more) = match n {
        Some(n) if n < after.len() => (&after[..n], true),
        _ => (&after[..], false),
    };
    let body = serde_json::json!({ "name": name, "tags": page }).to_string();
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let (true, Some(n), Some(last_on_page)) = (more, n, page.last()) {
        let ns = ns.map(|ns| format!("&ns={ns}")).unwrap_or_default();
        resp = resp.header(
            header::LINK,
            format!("</v2/{name}/tags/list?n={n}&last={last_on_page}{ns}>; rel=\"next\""),
        );
    }
    resp.body(full(body)).expect("valid headers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn verified_relay_withholds_the_end_of_a_wrong_blob() {
        let chunks = || {
            futures_util::stream::iter(vec![
                Ok(Bytes::from_static(b"ab")),
                Ok(Bytes::from_static(b"cd")),
            ])
        };
        let good: Vec<_> = verified(chunks(), Digest::sha256_of(b"abcd"))
            .collect()
            .await;
        assert_eq!(
            good.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]
        );
        let bad: Vec<_> = verified(chunks(), Digest::sha256_of(b"abce"))
            .collect()
            .await;
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].as_ref().unwrap(), &Bytes::from_static(b"ab"));
        assert!(bad[1].is_err());
    }

    #[tokio::test]
    async fn tag_pages_link_to_the_next() {
        let tags = vec!["b".to_string(), "a".into(), "c".into(), "d".into()];
        let resp = tag_page("library/x", Some("docker.io"), tags.clone(), Some(2), None);
        assert_eq!(
            resp.headers()[header::LINK],
            "</v2/library/x/tags/list?n=2&last=b&ns=docker.io>; rel=\"next\""
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"{"name":"library/x","tags":["a","b"]}"#);
        let resp = tag_page("library/x", None, tags, Some(2), Some("b"));
        assert!(resp.headers().get(header::LINK).is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, r#"{"name":"library/x","tags":["c","d"]}"#);
    }
}
