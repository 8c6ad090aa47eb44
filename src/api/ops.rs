//! The admin listener's endpoints: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (the data dir takes
//! writes and the index answers). An upstream outage never makes wharf
//! unready: the cache still serves.

use super::{full, Api, Body};
use http::{header, Request, Response, StatusCode};
use std::sync::Arc;

pub async fn handle<B>(api: Arc<Api>, req: Request<B>) -> Response<Body> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full(body))
            .expect("static headers")
    };
    match req.uri().path() {
        "/metrics" => {
            let (blobs, bytes) = api.cache().usage();
            api.metrics().cache_blobs.set(blobs as i64);
            api.metrics().cache_bytes.set(bytes as i64);
            Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(full(api.metrics().encode()))
                .expect("static headers")
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let cache = api.cache().clone();
            let ready = tokio::task::spawn_blocking(move || cache.check_ready())
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match ready {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(reason) => {
                    tracing::warn!(reason, "not ready");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {reason}\n"),
                    )
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
