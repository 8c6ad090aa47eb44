//! Prometheus metrics: one [`Metrics`] per server, shared by the API, the
//! cache and the upstream clients, encoded as text on the admin listener.
//! Owns metric names and labels only; it never decides anything.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub upstream: String,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// `hit`, `miss`, `revalidated` or `stale`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub upstream: String,
    /// `cache` (a committed blob) or `fill` (a blob arriving from upstream).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub upstream: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    /// Which guard refused: `unauthenticated`, `bad_credentials`,
    /// `login_backoff`, `policy`, `client_limit`, `fill_limit`,
    /// `connection_limit`, `header_size`, `url_length`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `upstream` or `bucket` (the fleet's shared bucket).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RequestLabels>,
    pub cache_results: Family<CacheLabels, Counter>,
    pub served_bytes: Family<ServedLabels, Counter>,
    pub fetched_bytes: Family<UpstreamLabels, Counter>,
    pub fills_in_flight: Gauge,
    pub fill_clients: Gauge,
    pub upstream_duration: HistogramFamily<UpstreamLabels>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub token_fetches: Family<UpstreamLabels, Counter>,
    pub cache_bytes: Gauge,
    pub cache_blobs: Gauge,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    pub rejected: Family<RejectedLabels, Counter>,
    pub fills: Family<SourceLabels, Counter>,
    pub bucket_uploads: Family<ResultLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("wharf");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            cache_results: Family::default(),
            served_bytes: Family::default(),
            fetched_bytes: Family::default(),
            fills_in_flight: Gauge::default(),
            fill_clients: Gauge::default(),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            upstream_errors: Family::default(),
            token_fetches: Family::default(),
            cache_bytes: Gauge::default(),
            cache_blobs: Gauge::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            rejected: Family::default(),
            fills: Family::default(),
            bucket_uploads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by endpoint, method and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by endpoint, method and status",
            m.request_duration.clone(),
        );
        registry.register(
            "cache_requests",
            "Manifest and blob requests by upstream and result (hit, miss, revalidated, stale)",
            m.cache_results.clone(),
        );
        registry.register(
            "served_bytes",
            "Blob bytes sent to clients, by upstream and source",
            m.served_bytes.clone(),
        );
        registry.register(
            "upstream_fetched_bytes",
            "Bytes fetched from upstream",
            m.fetched_bytes.clone(),
        );
        registry.register(
            "fills_in_flight",
            "Blob fills from upstream in progress",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "fill_clients",
            "Client responses attached to fills in progress",
            m.fill_clients.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time to upstream response headers",
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "token_fetches",
            "Bearer tokens fetched from upstream realms",
            m.token_fetches.clone(),
        );
        registry.register(
            "cache_size_bytes",
            "Bytes of blobs on disk",
            m.cache_bytes.clone(),
        );
        registry.register("cache_blobs", "Blobs on disk", m.cache_blobs.clone());
        registry.register(
            "evictions",
            "Blobs evicted by the byte budget",
            m.evictions.clone(),
        );
        registry.register(
            "evicted_bytes",
            "Bytes evicted by the byte budget",
            m.evicted_bytes.clone(),
        );
        registry.register(
            "rejected",
            "Requests and connections refused by a guard (auth, policy, limits), by reason",
            m.rejected.clone(),
        );
        registry.register(
            "fills",
            "Blob fills started, by where the bytes came from (upstream, or the fleet's bucket)",
            m.fills.clone(),
        );
        registry.register(
            "bucket_uploads",
            "Blobs uploaded to the fleet's shared bucket, by result",
            m.bucket_uploads.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn fill(&self, source: &'static str) {
        self.fills.get_or_create(&SourceLabels { source }).inc();
    }

    pub fn bucket_upload(&self, result: &'static str) {
        self.bucket_uploads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected
            .get_or_create(&RejectedLabels { reason })
            .inc();
    }

    pub fn upstream(&self, upstream: &str) -> UpstreamLabels {
        UpstreamLabels {
            upstream: upstream.to_owned(),
        }
    }
}

/// Decrements a gauge when dropped: counts things that live as long as a value.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::default();
        m.requests
            .get_or_create(&RequestLabels {
                endpoint: "blob",
                method: "GET".into(),
                status: 200,
            })
            .inc();
        m.cache_bytes.set(42);
        let text = m.encode();
        assert!(
            text.contains(
                "wharf_requests_total{endpoint=\"blob\",method=\"GET\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("wharf_cache_size_bytes 42"), "{text}");
        assert!(text.contains("# TYPE wharf_evictions counter"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
