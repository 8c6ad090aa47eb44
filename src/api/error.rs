//! The one place an error becomes an HTTP response. Every error wharf can
//! meet while answering is classified here by an exhaustive match: bad
//! client input → 4xx with its OCI code, upstream trouble → the upstream's
//! verdict or 502/504, our own failure → 500.

use super::route::RouteError;
use super::Body;
use crate::access::AccessError;
use crate::cache::CacheError;
use crate::upstream::UpstreamError;
use http::{header, HeaderValue, Response, StatusCode};

/// What the failed request was about, so "not found upstream" gets the
/// right OCI code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Manifest,
    Blob,
    Repository,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{source}")]
    Cache {
        subject: Subject,
        source: CacheError,
    },
    #[error("requested range not satisfiable (blob is {len} bytes)")]
    RangeNotSatisfiable { len: u64 },
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("request headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("request URL is longer than {limit} bytes")]
    UrlTooLong { limit: usize },
}

impl ApiError {
    pub fn cache(subject: Subject) -> impl FnOnce(CacheError) -> ApiError {
        move |source| ApiError::Cache { subject, source }
    }

    pub fn upstream(subject: Subject, upstream: &str, error: UpstreamError) -> ApiError {
        ApiError::Cache {
            subject,
            source: CacheError::Upstream {
                upstream: upstream.to_owned(),
                error,
            },
        }
    }

    /// The `wharf_rejected_total` reason, when a guard refused the request.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            ApiError::Access(e) => Some(e.reason()),
            ApiError::HeadersTooLarge { .. } => Some("header_size"),
            ApiError::UrlTooLong { .. } => Some("url_length"),
            ApiError::Cache {
                source: CacheError::TooManyFills { .. },
                ..
            } => Some("fill_limit"),
            ApiError::Route(_) | ApiError::Cache { .. } | ApiError::RangeNotSatisfiable { .. } => {
                None
            }
        }
    }

    /// Whether this is wharf's own failure rather than the client's or upstream's.
    pub fn is_internal(&self) -> bool {
        self.classify().0 == StatusCode::INTERNAL_SERVER_ERROR
    }

    fn classify(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::Route(e) => match e {
                RouteError::NotFound => (StatusCode::NOT_FOUND, "UNSUPPORTED", None),
                RouteError::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", None),
                RouteError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID", None),
                RouteError::TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID", None),
                RouteError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID", None),
                RouteError::QueryInvalid(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED", None),
                RouteError::UnknownUpstream(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN", None),
            },
            ApiError::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED", None)
            }
            ApiError::Cache { subject, source } => classify_cache(*subject, source),
            ApiError::Access(e) => match e {
                AccessError::Unauthenticated { .. } | AccessError::BadCredentials { .. } => {
                    (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", None)
                }
                AccessError::LoginBackoff { retry_after } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    Some(retry_after.to_string()),
                ),
                AccessError::Denied(_) => (StatusCode::FORBIDDEN, "DENIED", None),
                AccessError::ClientBusy { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    Some("1".into()),
                ),
            },
            ApiError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "UNSUPPORTED",
                None,
            ),
            ApiError::UrlTooLong { .. } => (StatusCode::URI_TOO_LONG, "UNSUPPORTED", None),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, code, retry_after) = self.classify();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": null }]
        });
        let mut resp = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Docker-Distribution-API-Version", "registry/2.0");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            resp = resp.header(header::ALLOW, "GET, HEAD");
        }
        match &self {
            ApiError::RangeNotSatisfiable { len } => {
                resp = resp.header(header::CONTENT_RANGE, format!("bytes */{len}"));
            }
            ApiError::Access(
                AccessError::Unauthenticated { realm } | AccessError::BadCredentials { realm },
            ) => {
                resp = resp.header(
                    header::WWW_AUTHENTICATE,
                    format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
                );
            }
            _ => {}
        }
        if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            resp = resp.header(header::RETRY_AFTER, v);
        }
        resp.body(super::full(body.to_string()))
            .expect("static headers are valid")
    }
}

fn classify_cache(subject: Subject, e: &CacheError) -> (StatusCode, &'static str, Option<String>) {
    match e {
        CacheError::Upstream { error, .. } => match error {
            UpstreamError::NotFound => {
                let code = match subject {
                    Subject::Manifest => "MANIFEST_UNKNOWN",
                    Subject::Blob => "BLOB_UNKNOWN",
                    Subject::Repository => "NAME_UNKNOWN",
                };
                (StatusCode::NOT_FOUND, code, None)
            }
            UpstreamError::Denied(_) => (StatusCode::FORBIDDEN, "DENIED", None),
            UpstreamError::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
                retry_after.clone(),
            ),
            UpstreamError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE", None),
            UpstreamError::Status(_)
            | UpstreamError::Connect(_)
            | UpstreamError::Body(_)
            | UpstreamError::Protocol(_) => (StatusCode::BAD_GATEWAY, "UNAVAILABLE", None),
            UpstreamError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", None),
            UpstreamError::Refused(_) => (StatusCode::BAD_GATEWAY, "DENIED", None),
        },
        CacheError::DigestMismatch { .. } => (StatusCode::BAD_GATEWAY, "UNAVAILABLE", None),
        CacheError::FillFailed(_) | CacheError::Bucket(_) => {
            (StatusCode::BAD_GATEWAY, "UNAVAILABLE", None)
        }
        CacheError::StorageUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", None),
        CacheError::TooManyFills { .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            Some("1".into()),
        ),
        CacheError::Shared(inner) => classify_cache(subject, inner),
        CacheError::Storage(_) | CacheError::Index(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_and_code(e: ApiError) -> (u16, String) {
        let resp = e.into_response();
        let status = resp.status().as_u16();
        (status, format!("{:?}", resp.into_body()))
    }

    #[test]
    fn upstream_not_found_names_the_subject() {
        let e = ApiError::upstream(Subject::Blob, "docker.io", UpstreamError::NotFound);
        assert_eq!(e.classify().1, "BLOB_UNKNOWN");
        let e = ApiError::upstream(Subject::Manifest, "docker.io", UpstreamError::NotFound);
        assert_eq!(e.classify().1, "MANIFEST_UNKNOWN");
        assert_eq!(status_and_code(e).0, 404);
    }

    #[test]
    fn outages_are_bad_gateway_and_name_the_upstream() {
        let e = ApiError::upstream(
            Subject::Manifest,
            "ghcr.io",
            UpstreamError::Connect("refused".into()),
        );
        assert!(e.to_string().contains("ghcr.io"));
        assert_eq!(e.classify().0, StatusCode::BAD_GATEWAY);
        let e = ApiError::upstream(
            Subject::Blob,
            "x",
            UpstreamError::RateLimited {
                retry_after: Some("7".into()),
            },
        );
        let resp = e.into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
        let shared = ApiError::Cache {
            subject: Subject::Blob,
            source: CacheError::Shared(std::sync::Arc::new(CacheError::Storage(
                std::io::Error::other("disk"),
            ))),
        };
        assert!(shared.is_internal());
    }
}
