//! pullstorm: replays N simulated nodes pulling a list of images from any
//! registry URL the way a container runtime does (HEAD the tag, GET the
//! manifest or index, pick a platform, GET the config and the layers), and
//! reports images/s, bytes/s, time-to-first-byte and whole-pull latency
//! percentiles, and errors by kind. Every blob and manifest is verified
//! against its sha256 digest as it streams in; nothing is buffered whole.
//!
//! It can also seed a registry with synthetic images through the plain push
//! API (`--seed`), so a benchmark or a CI smoke test needs nothing but an
//! empty distribution registry.
//!
//! Run: `cargo bench --bench pullstorm -- --registry http://127.0.0.1:5000 --image library/alpine:3.20 --nodes 20`.
//! `tests/pullstorm_smoke.rs` includes this file as a module and calls [`run`].
#![allow(dead_code)]

use bytes::Bytes;
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Parser, Debug, Clone)]
#[command(
    name = "pullstorm",
    about = "Replay many nodes pulling images from a registry; report throughput, latency, errors"
)]
pub struct Opts {
    /// Registry base URL (wharf, a distribution registry, nginx…).
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    pub registry: String,
    /// NAME:TAG or NAME@sha256:…; repeatable.
    #[arg(long = "image", value_name = "NAME:TAG")]
    pub images: Vec<String>,
    /// File with one image per line (# comments allowed).
    #[arg(long = "images", value_name = "FILE")]
    pub images_file: Option<PathBuf>,
    /// Simulated nodes; each has its own connection pool and pulls the list in order.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Blobs a node fetches at once (containerd's max_concurrent_downloads is 3).
    #[arg(long, default_value_t = 3)]
    pub concurrency_per_node: usize,
    /// Requests in flight over all nodes.
    #[arg(long, default_value_t = 512)]
    pub max_inflight: usize,
    /// Registry host to name with `?ns=` (as containerd does for a mirror).
    #[arg(long, value_name = "HOST")]
    pub ns: Option<String>,
    /// Platform picked from an index: os/arch[/variant].
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Fetch layers in Range requests of this many bytes (e.g. 8MiB), like containerd.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub range_chunk: Option<u64>,
    /// Range chunks of one layer in flight at once (each chunk is held in memory until hashed in order).
    #[arg(long, default_value_t = 1)]
    pub range_parallel: usize,
    /// Times each node pulls the whole list (default 1, or unbounded with --duration).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Stop starting pulls after this long (e.g. 30s); in-flight pulls get `--grace` more.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Hard bound after --duration (or on the whole run without it): pulls still running are abandoned.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub grace: Duration,
    /// Per-request bound on waiting for headers or for the next body bytes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub request_timeout: Duration,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Sample this process's memory (VmRSS, VmHWM) during the run, e.g. the server's PID.
    #[arg(long, value_name = "PID")]
    pub watch_pid: Option<u32>,
    /// A name for this run in the report.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Push the --image list (synthetic content) to --registry before pulling.
    #[arg(long)]
    pub seed: bool,
    /// Seed and exit.
    #[arg(long)]
    pub seed_only: bool,
    /// Layers per seeded image.
    #[arg(long, default_value_t = 3)]
    pub seed_layers: usize,
    /// Size of each seeded layer (e.g. 512MiB).
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    pub seed_layer_size: u64,
    /// Seed each tag as an OCI index of linux/amd64 and linux/arm64.
    #[arg(long)]
    pub seed_index: bool,
    /// Also write each seeded layer to DIR/<hex> (e.g. for nginx to serve the same bytes).
    #[arg(long, value_name = "DIR")]
    pub blob_dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" | "ki" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" | "mi" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" | "gi" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?} (use B, KiB, MiB, GiB)")),
    };
    Ok(n * mult)
}

// ---------------------------------------------------------------------------
// Images and descriptors

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    /// A tag or `sha256:…`.
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, String> {
        let s = s.trim();
        if let Some((name, digest)) = s.split_once('@') {
            return Ok(ImageRef {
                name: name.into(),
                reference: digest.into(),
            });
        }
        // The tag follows the last ':' after the last '/' (a host:port prefix has a '/' after it).
        let slash = s.rfind('/').map(|i| i + 1).unwrap_or(0);
        match s[slash..].rfind(':') {
            Some(i) => Ok(ImageRef {
                name: s[..slash + i].into(),
                reference: s[slash + i + 1..].into(),
            }),
            None if !s.is_empty() => Ok(ImageRef {
                name: s.into(),
                reference: "latest".into(),
            }),
            None => Err("empty image reference".into()),
        }
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reference.contains(':') {
            write!(f, "{}@{}", self.name, self.reference)
        } else {
            write!(f, "{}:{}", self.name, self.reference)
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize, Serialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, serde::Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub struct PullError {
    pub kind: &'static str,
    pub detail: String,
}

impl PullError {
    fn new(kind: &'static str, detail: impl Into<String>) -> PullError {
        PullError {
            kind,
            detail: detail.into(),
        }
    }

    fn from_reqwest(e: reqwest::Error, what: &str) -> PullError {
        let kind = if e.is_timeout() {
            "timeout"
        } else if e.is_connect() {
            "connect"
        } else if e.is_body() || e.is_decode() {
            "body"
        } else {
            "request"
        };
        PullError::new(kind, format!("{what}: {e}"))
    }
}

fn status_kind(status: u16) -> &'static str {
    match status {
        401 | 403 => "http_auth",
        404 => "http_404",
        416 => "http_416",
        429 => "http_429",
        400..=499 => "http_4xx",
        502 | 504 => "http_502_504",
        500..=599 => "http_5xx",
        _ => "http_other",
    }
}

// ---------------------------------------------------------------------------
// Statistics

#[derive(Default)]
pub struct Stats {
    bytes: AtomicU64,
    requests: AtomicU64,
    pulls_ok: AtomicU64,
    pulls_failed: AtomicU64,
    inflight: AtomicU64,
    /// Microseconds from sending a request to its response headers.
    ttfb_manifest_us: Mutex<Vec<u64>>,
    ttfb_blob_us: Mutex<Vec<u64>>,
    pull_us: Mutex<Vec<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    first_errors: Mutex<Vec<String>>,
}

impl Stats {
    fn error(&self, e: &PullError) {
        *self
            .errors
            .lock()
            .expect("stats")
            .entry(e.kind.to_string())
            .or_default() += 1;
        let mut first = self.first_errors.lock().expect("stats");
        if first.len() < 10 {
            first.push(format!("{}: {}", e.kind, e.detail));
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn percentiles(samples: &mut [u64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i] as f64 / 1000.0
    };
    Percentiles {
        count: samples.len(),
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        max_ms: samples[samples.len() - 1] as f64 / 1000.0,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: Option<String>,
    pub registry: String,
    pub images: Vec<String>,
    pub nodes: usize,
    pub concurrency_per_node: usize,
    pub range_chunk: Option<u64>,
    pub wall_s: f64,
    pub pulls_ok: u64,
    pub pulls_failed: u64,
    pub images_per_s: f64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    pub requests: u64,
    pub ttfb_manifest: Percentiles,
    pub ttfb_blob: Percentiles,
    pub pull: Percentiles,
    pub errors: BTreeMap<String, u64>,
    pub first_errors: Vec<String>,
    /// True if the hard bound cut pulls short.
    pub aborted: bool,
    pub watched_pid: Option<u32>,
    /// Highest VmRSS sampled during the run, MiB.
    pub rss_peak_sampled_mib: Option<f64>,
    /// VmHWM at the end of the run, MiB (peak since start or the last reset via clear_refs).
    pub rss_hwm_mib: Option<f64>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let gib = |b: f64| b / (1u64 << 30) as f64;
        s.push_str(&format!(
            "pullstorm{}: {} node(s) × {} image(s) against {}{}\n",
            self.label
                .as_deref()
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default(),
            self.nodes,
            self.images.len(),
            self.registry,
            self.range_chunk
                .map(|c| format!(", Range chunks of {c} B"))
                .unwrap_or_default()
        ));
        s.push_str(&format!(
            "  pulls ok / failed   {} / {}{}\n",
            self.pulls_ok,
            self.pulls_failed,
            if self.aborted {
                " (aborted at the hard bound)"
            } else {
                ""
            }
        ));
        s.push_str(&format!("  wall                {:.3} s\n", self.wall_s));
        s.push_str(&format!("  images/s            {:.2}\n", self.images_per_s));
        s.push_str(&format!(
            "  bytes               {:.3} GiB  ({:.1} MiB/s)\n",
            gib(self.bytes as f64),
            self.bytes_per_s / (1u64 << 20) as f64
        ));
        s.push_str(&format!("  requests            {}\n", self.requests));
        s.push_str("                      count      p50 ms     p90 ms     p99 ms     max ms\n");
        for (name, p) in [
            ("ttfb manifest", &self.ttfb_manifest),
            ("ttfb blob", &self.ttfb_blob),
            ("whole pull", &self.pull),
        ] {
            s.push_str(&format!(
                "  {name:<16} {:>8} {:>11.2} {:>10.2} {:>10.2} {:>10.2}\n",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            ));
        }
        if self.errors.is_empty() {
            s.push_str("  errors              none\n");
        } else {
            s.push_str("  errors by kind\n");
            for (k, v) in &self.errors {
                s.push_str(&format!("    {k:<18} {v}\n"));
            }
            for e in &self.first_errors {
                s.push_str(&format!("    e.g. {e}\n"));
            }
        }
        if let Some(pid) = self.watched_pid {
            s.push_str(&format!(
                "  memory of pid {pid}  peak VmRSS sampled {:.1} MiB, VmHWM {:.1} MiB\n",
                self.rss_peak_sampled_mib.unwrap_or(f64::NAN),
                self.rss_hwm_mib.unwrap_or(f64::NAN)
            ));
        }
        s
    }
}

/// (VmRSS, VmHWM) of `pid` in MiB.
pub fn proc_memory(pid: u32) -> Option<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

// ---------------------------------------------------------------------------
// Pulling

struct Ctx {
    opts: Opts,
    base: String,
    stats: Stats,
    inflight: Arc<Semaphore>,
    platform: Platform,
    stop: AtomicBool,
}

struct Node {
    client: reqwest::Client,
    ctx: Arc<Ctx>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Manifest,
    Blob,
}

/// A response plus the in-flight permit it holds until its body is read.
struct Held {
    resp: reqwest::Response,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    let mut parts = s.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
            Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            })
        }
        _ => Err(format!("bad platform {s:?}: expected os/arch[/variant]")),
    }
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Node {
    fn url(&self, name: &str, kind: &str, reference: &str) -> String {
        let mut u = format!("{}/v2/{name}/{kind}/{reference}", self.ctx.base);
        if let Some(ns) = &self.ctx.opts.ns {
            u.push_str("?ns=");
            u.push_str(ns);
        }
        u
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        kind: Kind,
        what: &str,
    ) -> Result<Held, PullError> {
        let permit = self
            .ctx
            .inflight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PullError::new("aborted", "semaphore closed"))?;
        let started = Instant::now();
        self.ctx.stats.inflight.fetch_add(1, Ordering::Relaxed);
        let sent = tokio::time::timeout(self.ctx.opts.request_timeout, req.send()).await;
        self.ctx.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        self.ctx.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = match sent {
            Err(_) => return Err(PullError::new("timeout", format!("{what}: no headers"))),
            Ok(Err(e)) => return Err(PullError::from_reqwest(e, what)),
            Ok(Ok(resp)) => resp,
        };
        let us = started.elapsed().as_micros() as u64;
        let samples = match kind {
            Kind::Manifest => &self.ctx.stats.ttfb_manifest_us,
            Kind::Blob => &self.ctx.stats.ttfb_blob_us,
        };
        samples.lock().expect("stats").push(us);
        Ok(Held {
            resp,
            _permit: permit,
        })
    }

    async fn next_chunk(&self, held: &mut Held, what: &str) -> Result<Option<Bytes>, PullError> {
        match tokio::time::timeout(self.ctx.opts.request_timeout, held.resp.chunk()).await {
            Err(_) => Err(PullError::new("timeout", format!("{what}: body stalled"))),
            Ok(Err(e)) => Err(PullError::from_reqwest(e, what)),
            Ok(Ok(chunk)) => {
                if let Some(c) = &chunk {
                    self.ctx
                        .stats
                        .bytes
                        .fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                Ok(chunk)
            }
        }
    }

    fn check_status(held: &Held, want: u16, what: &str) -> Result<(), PullError> {
        let status = held.resp.status().as_u16();
        if status == want {
            Ok(())
        } else {
            Err(PullError::new(
                status_kind(status),
                format!("{what}: HTTP {status}, wanted {want}"),
            ))
        }
    }

    /// GET a manifest (small: read whole, with a cap), verify against `expected` if known.
    async fn get_manifest(
        &self,
        name: &str,
        reference: &str,
        expected: Option<&str>,
    ) -> Result<(String, Bytes), PullError> {
        let what = format!("GET manifest {name}:{reference}");
        let req = self
            .client
            .get(self.url(name, "manifests", reference))
            .header("Accept", MANIFEST_TYPES);
        let mut held = self.send(req, Kind::Manifest, &what).await?;
        Self::check_status(&held, 200, &what)?;
        let content_type = held
            .resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let header_digest = held
            .resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk(&mut held, &what).await? {
            body.extend_from_slice(&chunk);
            if body.len() > 16 << 20 {
                return Err(PullError::new(
                    "manifest_parse",
                    format!("{what}: over 16 MiB"),
                ));
            }
        }
        let actual = sha256_digest(&body);
        let expected = expected
            .map(str::to_string)
            .or(reference
                .starts_with("sha256:")
                .then(|| reference.to_string()))
            .or(header_digest);
        if let Some(expected) = expected {
            if expected.starts_with("sha256:") && expected != actual {
                return Err(PullError::new(
                    "digest_mismatch",
                    format!("{what}: body hashes to {actual}, expected {expected}"),
                ));
            }
        }
        Ok((content_type, Bytes::from(body)))
    }

    async fn pull(&self, image: &ImageRef) -> Result<(), PullError> {
        let name = &image.name;
        // 1. Resolve: HEAD the tag (Docker Hub does not count HEADs).
        let mut digest = image
            .reference
            .starts_with("sha256:")
            .then(|| image.reference.clone());
        if digest.is_none() {
            let what = format!("HEAD manifest {image}");
            let req = self
                .client
                .head(self.url(name, "manifests", &image.reference))
                .header("Accept", MANIFEST_TYPES);
            let held = self.send(req, Kind::Manifest, &what).await?;
            Self::check_status(&held, 200, &what)?;
            digest = held
                .resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        // 2. GET it by digest when known (as containerd does), else by tag.
        let reference = digest.clone().unwrap_or_else(|| image.reference.clone());
        let (mut content_type, mut bytes) = self
            .get_manifest(name, &reference, digest.as_deref())
            .await?;
        let mut doc: ManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| PullError::new("manifest_parse", format!("{image}: {e}")))?;
        // 3. An index: pick the platform and fetch that child only.
        let is_index = |ct: &str, doc: &ManifestDoc| {
            ct.starts_with(OCI_INDEX)
                || ct.starts_with(DOCKER_LIST)
                || doc.media_type.as_deref() == Some(OCI_INDEX)
                || doc.media_type.as_deref() == Some(DOCKER_LIST)
                || (doc.manifests.is_some() && doc.layers.is_none())
        };
        if is_index(&content_type, &doc) {
            let want = &self.ctx.platform;
            let child = doc
                .manifests
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|d| {
                    d.platform.as_ref().is_some_and(|p| {
                        p.os == want.os
                            && p.architecture == want.architecture
                            && (want.variant.is_none() || p.variant == want.variant)
                    })
                })
                .cloned()
                .ok_or_else(|| {
                    PullError::new("no_platform", format!("{image}: no {:?} in index", want))
                })?;
            (content_type, bytes) = self
                .get_manifest(name, &child.digest, Some(&child.digest))
                .await?;
            if bytes.len() as u64 != child.size {
                return Err(PullError::new(
                    "size_mismatch",
                    format!(
                        "{image}: child manifest is {} B, index says {}",
                        bytes.len(),
                        child.size
                    ),
                ));
            }
            doc = serde_json::from_slice(&bytes)
                .map_err(|e| PullError::new("manifest_parse", format!("{image}: {e}")))?;
            if is_index(&content_type, &doc) {
                return Err(PullError::new(
                    "manifest_parse",
                    format!("{image}: nested index"),
                ));
            }
        }
        // 4. Config and layers, a few at a time.
        let config = doc
            .config
            .ok_or_else(|| PullError::new("manifest_parse", format!("{image}: no config")))?;
        let mut blobs = vec![config];
        blobs.extend(doc.layers.unwrap_or_default());
        futures_util::stream::iter(blobs.into_iter().map(Ok))
            .try_for_each_concurrent(self.ctx.opts.concurrency_per_node.max(1), |d| async move {
                self.fetch_blob(name, &d).await
            })
            .await
    }

    async fn fetch_blob(&self, name: &str, d: &Descriptor) -> Result<(), PullError> {
        let Some(expected_hex) = d.digest.strip_prefix("sha256:") else {
            return Err(PullError::new(
                "unsupported_digest",
                format!("{}: only sha256 is verified", d.digest),
            ));
        };
        let mut hasher = Sha256::new();
        let got = match self.ctx.opts.range_chunk {
            Some(chunk) if d.size > chunk => self.fetch_ranges(name, d, chunk, &mut hasher).await?,
            _ => {
                let what = format!("GET blob {}", d.digest);
                let req = self.client.get(self.url(name, "blobs", &d.digest));
                let mut held = self.send(req, Kind::Blob, &what).await?;
                Self::check_status(&held, 200, &what)?;
                let mut got = 0u64;
                while let Some(chunk) = self.next_chunk(&mut held, &what).await? {
                    got += chunk.len() as u64;
                    if got > d.size {
                        return Err(PullError::new(
                            "size_mismatch",
                            format!("{what}: more than the {} B the manifest says", d.size),
                        ));
                    }
                    hasher.update(&chunk);
                }
                got
            }
        };
        if got != d.size {
            return Err(PullError::new(
                "short_body",
                format!("blob {}: {got} of {} B", d.digest, d.size),
            ));
        }
        let actual = hex::encode(hasher.finalize());
        if actual != expected_hex {
            return Err(PullError::new(
                "digest_mismatch",
                format!("blob {}: content hashes to sha256:{actual}", d.digest),
            ));
        }
        Ok(())
    }

    /// Range requests of `chunk` bytes, up to --range-parallel in flight,
    /// hashed in order.
    async fn fetch_ranges(
        &self,
        name: &str,
        d: &Descriptor,
        chunk: u64,
        hasher: &mut Sha256,
    ) -> Result<u64, PullError> {
        let ranges: Vec<(u64, u64)> = (0..d.size)
            .step_by(chunk as usize)
            .map(|start| (start, (start + chunk).min(d.size) - 1))
            .collect();
        let mut parts = futures_util::stream::iter(ranges)
            .map(|(start, end)| async move {
                let what = format!("GET blob {} bytes={start}-{end}", d.digest);
                let req = self
                    .client
                    .get(self.url(name, "blobs", &d.digest))
                    .header("Range", format!("bytes={start}-{end}"));
                let mut held = self.send(req, Kind::Blob, &what).await?;
                if held.resp.status().as_u16() == 200 {
                    return Err(PullError::new(
                        "range_ignored",
                        format!("{what}: 200 instead of 206"),
                    ));
                }
                Self::check_status(&held, 206, &what)?;
                let want_cr = format!("bytes {start}-{end}/{}", d.size);
                let cr = held
                    .resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if cr != want_cr {
                    return Err(PullError::new(
                        "bad_content_range",
                        format!("{what}: Content-Range {cr:?}, wanted {want_cr:?}"),
                    ));
                }
                let want = end - start + 1;
                let mut parts = Vec::new();
                let mut got = 0u64;
                while let Some(c) = self.next_chunk(&mut held, &what).await? {
                    got += c.len() as u64;
                    if got > want {
                        return Err(PullError::new("size_mismatch", format!("{what}: too long")));
                    }
                    parts.push(c);
                }
                if got != want {
                    return Err(PullError::new(
                        "short_body",
                        format!("{what}: {got} of {want} B"),
                    ));
                }
                Ok(parts)
            })
            .buffered(self.ctx.opts.range_parallel.max(1));
        let mut total = 0u64;
        while let Some(part) = parts.next().await {
            for c in part? {
                total += c.len() as u64;
                hasher.update(&c);
            }
        }
        Ok(total)
    }

    async fn run(&self, images: &[ImageRef], deadline: Option<Instant>) {
        let stats = &self.ctx.stats;
        // Runtimes ping the API root first.
        let ping = self.client.get(format!("{}/v2/", self.ctx.base));
        match self.send(ping, Kind::Manifest, "GET /v2/").await {
            Ok(held)
                if held.resp.status().as_u16() == 200 || held.resp.status().as_u16() == 401 => {}
            Ok(held) => stats.error(&PullError::new(
                status_kind(held.resp.status().as_u16()),
                format!("GET /v2/: HTTP {}", held.resp.status()),
            )),
            Err(e) => stats.error(&e),
        }
        let rounds = match (self.ctx.opts.rounds, self.ctx.opts.duration) {
            (Some(r), _) => r,
            (None, Some(_)) => u64::MAX,
            (None, None) => 1,
        };
        'rounds: for _ in 0..rounds {
            for image in images {
                if self.ctx.stop.load(Ordering::Relaxed)
                    || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break 'rounds;
                }
                let started = Instant::now();
                match self.pull(image).await {
                    Ok(()) => {
                        stats
                            .pull_us
                            .lock()
                            .expect("stats")
                            .push(started.elapsed().as_micros() as u64);
                        stats.pulls_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.pulls_failed.fetch_add(1, Ordering::Relaxed);
                        stats.error(&e);
                    }
                }
            }
        }
    }
}

pub fn load_images(opts: &Opts) -> Result<Vec<ImageRef>, String> {
    let mut list: Vec<String> = opts.images.clone();
    if let Some(file) = &opts.images_file {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        list.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    if list.is_empty() {
        return Err("no images: give --image NAME:TAG or --images FILE".into());
    }
    list.iter().map(|s| ImageRef::parse(s)).collect()
}

fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())
}

/// Pulls per `opts` and returns the report (does not print it).
pub async fn pull_storm(opts: &Opts) -> Result<Report, String> {
    let images = load_images(opts)?;
    let platform = parse_platform(&opts.platform)?;
    let ctx = Arc::new(Ctx {
        base: opts.registry.trim_end_matches('/').to_string(),
        opts: opts.clone(),
        stats: Stats::default(),
        inflight: Arc::new(Semaphore::new(opts.max_inflight.max(1))),
        platform,
        stop: AtomicBool::new(false),
    });
    let started = Instant::now();
    let deadline = opts.duration.map(|d| started + d);
    let hard_bound = opts.duration.unwrap_or_default() + opts.grace;

    let done = Arc::new(AtomicBool::new(false));
    let progress = (!opts.quiet).then(|| {
        let ctx = ctx.clone();
        let done = done.clone();
        let expected = opts.rounds.map(|r| r * images.len() as u64 * opts.nodes as u64);
        tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let mut last_bytes = 0u64;
            let mut last = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let s = &ctx.stats;
                let bytes = s.bytes.load(Ordering::Relaxed);
                let rate = (bytes - last_bytes) as f64 / last.elapsed().as_secs_f64();
                last_bytes = bytes;
                last = Instant::now();
                let ok = s.pulls_ok.load(Ordering::Relaxed);
                let line = format!(
                    "[{:>6.1}s] pulls ok {ok}{} failed {} | {:.1} MiB/s | {} req, {} in flight | errors {}",
                    started.elapsed().as_secs_f64(),
                    expected.map(|e| format!("/{e}")).unwrap_or_default(),
                    s.pulls_failed.load(Ordering::Relaxed),
                    rate / (1u64 << 20) as f64,
                    s.requests.load(Ordering::Relaxed),
                    s.inflight.load(Ordering::Relaxed),
                    s.errors.lock().expect("stats").values().sum::<u64>(),
                );
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r{line}\x1b[K");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
            if tty {
                let _ = writeln!(std::io::stderr());
            }
        })
    });

    let rss = opts.watch_pid.map(|pid| {
        let done = done.clone();
        tokio::spawn(async move {
            let mut peak = 0f64;
            while !done.load(Ordering::Relaxed) {
                if let Some((rss, _)) = proc_memory(pid) {
                    peak = peak.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    });

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.nodes.max(1) {
        let node = Node {
            client: client()?,
            ctx: ctx.clone(),
        };
        let images = images.clone();
        tasks.spawn(async move { node.run(&images, deadline).await });
    }
    let all = async { while tasks.join_next().await.is_some() {} };
    let aborted = tokio::time::timeout(hard_bound, all).await.is_err();
    if aborted {
        ctx.stop.store(true, Ordering::Relaxed);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        ctx.stats.error(&PullError::new(
            "aborted",
            format!("pulls still running at the hard bound ({hard_bound:?})"),
        ));
    }
    let wall = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
    }
    let rss_peak = match rss {
        Some(t) => t.await.ok(),
        None => None,
    };
    let s = &ctx.stats;
    let ok = s.pulls_ok.load(Ordering::Relaxed);
    let bytes = s.bytes.load(Ordering::Relaxed);
    let report = Report {
        label: opts.label.clone(),
        registry: ctx.base.clone(),
        images: images.iter().map(ToString::to_string).collect(),
        nodes: opts.nodes,
        concurrency_per_node: opts.concurrency_per_node,
        range_chunk: opts.range_chunk,
        wall_s: wall,
        pulls_ok: ok,
        pulls_failed: s.pulls_failed.load(Ordering::Relaxed),
        images_per_s: ok as f64 / wall,
        bytes,
        bytes_per_s: bytes as f64 / wall,
        requests: s.requests.load(Ordering::Relaxed),
        ttfb_manifest: percentiles(&mut s.ttfb_manifest_us.lock().expect("stats")),
        ttfb_blob: percentiles(&mut s.ttfb_blob_us.lock().expect("stats")),
        pull: percentiles(&mut s.pull_us.lock().expect("stats")),
        errors: s.errors.lock().expect("stats").clone(),
        first_errors: s.first_errors.lock().expect("stats").clone(),
        aborted,
        watched_pid: opts.watch_pid,
        rss_peak_sampled_mib: rss_peak,
        rss_hwm_mib: opts.watch_pid.and_then(proc_memory).map(|(_, hwm)| hwm),
    };
    Ok(report)
}

// ---------------------------------------------------------------------------
// Seeding synthetic images through the push API

/// Deterministic incompressible bytes (xorshift64*), so the same image name
/// and size give the same digests on every run.
pub struct Content {
    state: u64,
    left: u64,
}

impl Content {
    pub fn new(seed: &str, len: u64) -> Content {
        let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ len;
        for b in seed.bytes() {
            state = (state ^ b as u64).wrapping_mul(0x0100_0000_01B3);
        }
        Content {
            state: state | 1,
            left: len,
        }
    }

    /// The next chunk (up to 1 MiB), or None at the end.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(1 << 20) as usize;
        let mut buf = vec![0u8; n.div_ceil(8) * 8];
        for word in buf.chunks_exact_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            word.copy_from_slice(&self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        buf.truncate(n);
        self.left -= n as u64;
        Some(Bytes::from(buf))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Seeded {
    pub image: String,
    /// What the tag points at (an index with --seed-index).
    pub digest: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

async fn push_blob(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    digest: &str,
    len: u64,
    body: reqwest::Body,
) -> Result<(), String> {
    let head = c
        .head(format!("{base}/v2/{name}/blobs/{digest}"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if head.status().as_u16() == 200 {
        return Ok(());
    }
    let start = c
        .post(format!("{base}/v2/{name}/blobs/uploads/"))
        .send()
        .await
        .map_err(|e| format!("POST upload {name}: {e}"))?;
    if start.status().as_u16() != 202 {
        return Err(format!("POST upload {name}: HTTP {}", start.status()));
    }
    let location = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("upload without Location")?
        .to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", len)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("PUT blob {digest}: {e}"))?;
    if put.status().as_u16() != 201 {
        let status = put.status();
        let text = put.text().await.unwrap_or_default();
        return Err(format!("PUT blob {digest}: HTTP {status}: {text}"));
    }
    Ok(())
}

async fn push_bytes(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    media_type: &str,
    bytes: Vec<u8>,
) -> Result<Descriptor, String> {
    let digest = sha256_digest(&bytes);
    let size = bytes.len() as u64;
    push_blob(c, base, name, &digest, size, bytes.into()).await?;
    Ok(Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        platform: None,
    })
}

async fn push_manifest(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    reference: &str,
    media_type: &str,
    bytes: Vec<u8>,
) -> Result<Descriptor, String> {
    let digest = sha256_digest(&bytes);
    let size = bytes.len() as u64;
    let resp = c
        .put(format!("{base}/v2/{name}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .body(bytes)
        .send()
        .await
        .map_err(|e| format!("PUT manifest {name}:{reference}: {e}"))?;
    if resp.status().as_u16() != 201 {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(format!(
            "PUT manifest {name}:{reference}: HTTP {status}: {text}"
        ));
    }
    Ok(Descriptor {
        media_type: media_type.into(),
        digest,
        size,
        platform: None,
    })
}

/// Hashes a layer (writing it to `blob_dir` if given), then uploads it streamed.
async fn push_layer(
    c: &reqwest::Client,
    base: &str,
    name: &str,
    seed: &str,
    len: u64,
    blob_dir: Option<&PathBuf>,
) -> Result<Descriptor, String> {
    let dir = blob_dir.cloned();
    let seed_owned = seed.to_string();
    let digest = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let mut content = Content::new(&seed_owned, len);
        let mut hasher = Sha256::new();
        let tmp = dir
            .as_ref()
            .map(|d| d.join(format!(".{}.part", std::process::id())));
        let mut file = match &tmp {
            Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        while let Some(chunk) = content.next_chunk() {
            hasher.update(&chunk);
            if let Some(f) = file.as_mut() {
                f.write_all(&chunk).map_err(|e| e.to_string())?;
            }
        }
        let hex = hex::encode(hasher.finalize());
        if let (Some(tmp), Some(dir)) = (tmp, dir) {
            std::fs::rename(&tmp, dir.join(&hex)).map_err(|e| e.to_string())?;
        }
        Ok(format!("sha256:{hex}"))
    })
    .await
    .map_err(|e| e.to_string())??;
    let mut content = Content::new(seed, len);
    let stream = futures_util::stream::iter(std::iter::from_fn(move || content.next_chunk()))
        .map(Ok::<Bytes, std::io::Error>);
    push_blob(
        c,
        base,
        name,
        &digest,
        len,
        reqwest::Body::wrap_stream(stream),
    )
    .await?;
    Ok(Descriptor {
        media_type: OCI_LAYER.into(),
        digest,
        size: len,
        platform: None,
    })
}

async fn seed_image(
    c: &reqwest::Client,
    opts: &Opts,
    base: &str,
    image: &ImageRef,
) -> Result<Seeded, String> {
    let name = &image.name;
    let arches: &[&str] = if opts.seed_index {
        &["amd64", "arm64"]
    } else {
        &["amd64"]
    };
    let mut children = Vec::new();
    let mut chosen = None;
    for arch in arches {
        let mut layers = Vec::new();
        for i in 0..opts.seed_layers {
            // arm64 gets its own layers, so a pull that fetched them would show.
            let seed = format!("{name}:{}/{arch}/{i}", image.reference);
            layers.push(
                push_layer(
                    c,
                    base,
                    name,
                    &seed,
                    opts.seed_layer_size,
                    opts.blob_dir.as_ref(),
                )
                .await?,
            );
        }
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>()},
            "history": [{"created_by": format!("pullstorm seed {}", image)}],
        });
        let config = push_bytes(
            c,
            base,
            name,
            OCI_CONFIG,
            serde_json::to_vec(&config).expect("json"),
        )
        .await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).expect("json");
        let reference = if opts.seed_index {
            sha256_digest(&bytes)
        } else {
            image.reference.clone()
        };
        let mut desc = push_manifest(c, base, name, &reference, OCI_MANIFEST, bytes).await?;
        desc.platform = Some(Platform {
            os: "linux".into(),
            architecture: arch.to_string(),
            variant: None,
        });
        if *arch == "amd64" {
            chosen = Some((config, layers));
        }
        children.push(desc);
    }
    let (config, layers) = chosen.expect("amd64 is always seeded");
    let digest = if opts.seed_index {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": children,
        });
        push_manifest(
            c,
            base,
            name,
            &image.reference,
            OCI_INDEX,
            serde_json::to_vec(&index).expect("json"),
        )
        .await?
        .digest
    } else {
        children[0].digest.clone()
    };
    Ok(Seeded {
        image: image.to_string(),
        digest,
        config,
        layers,
    })
}

/// Pushes every --image to --registry (synthetic content).
pub async fn seed(opts: &Opts) -> Result<Vec<Seeded>, String> {
    let images = load_images(opts)?;
    if let Some(dir) = &opts.blob_dir {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let c = client()?;
    let base = opts.registry.trim_end_matches('/');
    let mut out = Vec::new();
    for image in &images {
        if image.reference.contains(':') {
            return Err(format!("{image}: seed needs a tag, not a digest"));
        }
        out.push(seed_image(&c, opts, base, image).await?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Entry points

/// What a run produced.
pub enum Outcome {
    Seeded(Vec<Seeded>),
    Pulled(Box<Report>),
}

/// Seeds if asked, then pulls; prints the table (stdout) and writes JSON if asked.
pub async fn run(opts: &Opts) -> Result<Outcome, String> {
    if opts.seed || opts.seed_only {
        let seeded = seed(opts).await?;
        for s in &seeded {
            let layers: Vec<String> = s
                .layers
                .iter()
                .map(|l| format!("{}:{}", l.digest, l.size))
                .collect();
            println!(
                "seeded {} digest={} config={} layers={}",
                s.image,
                s.digest,
                s.config.digest,
                layers.join(",")
            );
        }
        if opts.seed_only {
            if let Some(path) = &opts.json {
                let text = serde_json::to_string_pretty(&seeded).expect("json");
                std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            return Ok(Outcome::Seeded(seeded));
        }
    }
    let report = pull_storm(opts).await?;
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report).expect("json");
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Outcome::Pulled(Box::new(report)))
}

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(&opts)) {
        Ok(Outcome::Pulled(report)) if report.error_count() > 0 || report.pulls_ok == 0 => {
            eprintln!(
                "pullstorm: {} error(s), {} pull(s) ok",
                report.error_count(),
                report.pulls_ok
            );
            std::process::ExitCode::from(1)
        }
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullstorm: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
