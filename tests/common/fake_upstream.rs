//! An in-process fake OCI registry for integration tests.
//!
//! It listens on `127.0.0.1:0` inside the test's tokio runtime, records every
//! request it receives (so a test can say "the second pull made zero upstream
//! requests"), and can misbehave on purpose: token or Basic auth challenges,
//! 307 redirects of blob GETs to a second listener (a different port, so a
//! different host as far as an HTTP client is concerned), and per-reference
//! fault injection (connection reset mid-body, truncation, one wrong byte,
//! stalls, error statuses, slow transfers, more body than Content-Length).
//!
//! Blobs and manifests are stored per repository, like a real registry, so a
//! proxy that asks for the wrong repository name gets a 404.
#![allow(dead_code)]
// Handlers return a ready error response as their Err; its size is irrelevant in tests.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic, incompressible-looking bytes (xorshift64*), so tests need no
/// RNG crate and failures are reproducible.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// No authentication.
    #[default]
    None,
    /// Docker Hub style: 401 + `WWW-Authenticate: Bearer realm=.../token`.
    /// If `basic` is set, the token endpoint requires those Basic credentials.
    Bearer {
        basic: Option<(String, String)>,
        expires_in: u64,
    },
    /// 401 + `WWW-Authenticate: Basic realm="fake"`; requests must carry these credentials.
    Basic { username: String, password: String },
}

/// What field(s) the token endpoint uses for the token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenField {
    #[default]
    Both,
    Token,
    AccessToken,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub auth: Auth,
    pub token_field: TokenField,
    /// Tokens are only valid for the repositories in the scope they were issued for.
    pub strict_token_scope: bool,
    /// Blob GETs on the registry answer 307 to a second listener that serves the bytes.
    pub redirect_blobs: bool,
    /// Host name used in the redirect `Location` and the second-host realm
    /// (the port always differs from the registry's).
    pub redirect_host: String,
    /// Serve the token endpoint on the second listener (`http://{redirect_host}:PORT2/token`)
    /// instead of on the registry's own host:port.
    pub realm_on_second_host: bool,
    /// Honour `n`/`last` on tags/list. Distribution 2.8 as an upstream effectively doesn't.
    pub honor_tag_pagination: bool,
    /// Send `Docker-Content-Digest` on blob responses (Docker Hub sometimes doesn't).
    pub blob_digest_header: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: Auth::None,
            token_field: TokenField::Both,
            strict_token_scope: true,
            redirect_blobs: false,
            redirect_host: "127.0.0.1".to_string(),
            realm_on_second_host: false,
            honor_tag_pagination: false,
            blob_digest_header: true,
        }
    }
}

impl Options {
    pub fn bearer() -> Self {
        Options {
            auth: Auth::Bearer {
                basic: None,
                expires_in: 60,
            },
            ..Default::default()
        }
    }
    pub fn bearer_with_basic(user: &str, pass: &str) -> Self {
        Options {
            auth: Auth::Bearer {
                basic: Some((user.into(), pass.into())),
                expires_in: 60,
            },
            ..Default::default()
        }
    }
    pub fn basic(user: &str, pass: &str) -> Self {
        Options {
            auth: Auth::Basic {
                username: user.into(),
                password: pass.into(),
            },
            ..Default::default()
        }
    }
    pub fn with_redirect(mut self) -> Self {
        self.redirect_blobs = true;
        self
    }
}

// ---------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------

/// A misbehaviour applied to responses for one reference (blob digest,
/// manifest digest or tag). Body faults only apply to GETs; `Status` and
/// `Drop` apply to GET and HEAD.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Send headers and `after` body bytes, then reset the TCP connection (RST).
    Reset { after: usize },
    /// Send headers (full Content-Length) and `after` body bytes, then close cleanly (FIN).
    Truncate { after: usize },
    /// Flip one byte at this offset of the body that is sent; same length.
    WrongByte { at: usize },
    /// Send `after` bytes, then hang for `hold` (or until the client leaves), then drop the connection.
    Stall { after: usize, hold: Duration },
    /// Answer with this status and an OCI error body; optional `Retry-After` seconds.
    Status { code: u16, retry_after: Option<u64> },
    /// Close the connection without any response.
    Drop,
    /// Wait this long before sending the (good) response headers.
    SlowHeaders { delay: Duration },
    /// Declare a Content-Length `by` bytes short, yet put the whole body on
    /// the wire (the last `by` bytes after what was declared), then close.
    UnderstatedLength { by: usize },
}

impl Fault {
    fn is_body_fault(&self) -> bool {
        matches!(
            self,
            Fault::Reset { .. }
                | Fault::Truncate { .. }
                | Fault::WrongByte { .. }
                | Fault::Stall { .. }
                | Fault::UnderstatedLength { .. }
        )
    }
}

struct FaultEntry {
    fault: Fault,
    /// `None` = every request; `Some(n)` = the next n applicable requests.
    remaining: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
struct Throttle {
    chunk: usize,
    delay: Duration,
}

// ---------------------------------------------------------------------------
// Recording
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Registry,
    Redirect,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub host: Host,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub at: Instant,
}

impl Recorded {
    pub fn authorization(&self) -> Option<String> {
        self.headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct StoredManifest {
    media_type: String,
    bytes: Bytes,
}

struct Token {
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<(String, String), Bytes>,
    manifests: HashMap<(String, String), StoredManifest>,
    tags: HashMap<String, BTreeMap<String, String>>,
    faults: HashMap<String, FaultEntry>,
    throttles: HashMap<String, Throttle>,
    requests: Vec<Recorded>,
    tokens: HashMap<String, Token>,
    token_counter: u64,
    /// Drop every connection's requests without answering.
    down: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    opts: Options,
    addr: SocketAddr,
    redirect_addr: Option<SocketAddr>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the fault for the first of `keys` that has one, honouring one-shot counts.
    fn take_fault(&self, keys: &[&str], is_get: bool) -> Option<Fault> {
        let mut inner = self.lock();
        for key in keys {
            let Some(entry) = inner.faults.get_mut(*key) else {
                continue;
            };
            if !is_get && entry.fault.is_body_fault() {
                continue;
            }
            match entry.remaining {
                None => return Some(entry.fault.clone()),
                Some(0) => {
                    inner.faults.remove(*key);
                }
                Some(n) => {
                    entry.remaining = Some(n - 1);
                    let f = entry.fault.clone();
                    if n == 1 {
                        inner.faults.remove(*key);
                    }
                    return Some(f);
                }
            }
        }
        None
    }
}

/// The fake registry. Dropping it stops both listeners.
pub struct FakeUpstream {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl FakeUpstream {
    pub async fn start(opts: Options) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("local addr");
        let (redirect_listener, redirect_addr) = if opts.redirect_blobs || opts.realm_on_second_host
        {
            let l = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind fake redirect host");
            let a = l.local_addr().expect("local addr");
            (Some(l), Some(a))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            opts,
            addr,
            redirect_addr,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            Host::Registry,
            stop_rx.clone(),
        ))];
        if let Some(l) = redirect_listener {
            tasks.push(tokio::spawn(accept_loop(
                l,
                shared.clone(),
                Host::Redirect,
                stop_rx,
            )));
        }
        FakeUpstream {
            shared,
            stop_tx,
            tasks: Mutex::new(tasks),
        }
    }

    pub async fn start_default() -> FakeUpstream {
        Self::start(Options::default()).await
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }
    /// `http://HOST:PORT` of the second listener (redirect target / realm host), if any.
    pub fn redirect_url(&self) -> Option<String> {
        self.shared
            .redirect_addr
            .map(|a| format!("http://{}:{}", self.shared.opts.redirect_host, a.port()))
    }

    /// Stop both listeners and cut every open connection. Later connections are refused.
    pub async fn stop(&self) {
        let _ = self.stop_tx.send(true);
        let tasks: Vec<_> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// While down, every request's connection is closed without a response.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    // ----- content -------------------------------------------------------

    pub fn add_blob(&self, repo: &str, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.shared
            .lock()
            .blobs
            .insert((repo.to_string(), digest.clone()), bytes);
        digest
    }

    /// Store a blob under a digest that does not match its content.
    pub fn add_blob_with_digest(&self, repo: &str, digest: &str, bytes: impl Into<Bytes>) {
        self.shared
            .lock()
            .blobs
            .insert((repo.to_string(), digest.to_string()), bytes.into());
    }

    pub fn remove_blob(&self, repo: &str, digest: &str) {
        self.shared
            .lock()
            .blobs
            .remove(&(repo.to_string(), digest.to_string()));
    }

    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        let mut inner = self.shared.lock();
        inner.manifests.insert(
            (repo.to_string(), digest.clone()),
            StoredManifest {
                media_type: media_type.to_string(),
                bytes,
            },
        );
        if let Some(tag) = tag {
            inner
                .tags
                .entry(repo.to_string())
                .or_default()
                .insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// Point (or move) `tag` at `digest`.
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        self.shared
            .lock()
            .tags
            .entry(repo.to_string())
            .or_default()
            .insert(tag.to_string(), digest.to_string());
    }

    pub fn remove_tag(&self, repo: &str, tag: &str) {
        if let Some(t) = self.shared.lock().tags.get_mut(repo) {
            t.remove(tag);
        }
    }

    /// Add config + layers + an OCI image manifest, tagged `tag`.
    pub fn add_image(&self, repo: &str, tag: Option<&str>, layers: &[Vec<u8>]) -> Image {
        let layer_digests: Vec<String> = layers
            .iter()
            .map(|l| self.add_blob(repo, l.clone()))
            .collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
            "config": {},
        });
        let config_bytes = serde_json::to_vec(&config).expect("json");
        let config_digest = self.add_blob(repo, config_bytes.clone());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_bytes.len()},
            "layers": layers.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": OCI_LAYER_GZIP, "digest": d, "size": l.len()
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("json");
        let manifest_digest = self.add_manifest(repo, tag, OCI_MANIFEST, manifest_bytes.clone());
        Image {
            repo: repo.to_string(),
            manifest_digest,
            manifest: Bytes::from(manifest_bytes),
            media_type: OCI_MANIFEST.to_string(),
            config_digest,
            config: Bytes::from(config_bytes),
            layers: layer_digests
                .into_iter()
                .zip(layers.iter().map(|l| Bytes::from(l.clone())))
                .collect(),
        }
    }

    /// Add an OCI index over the given child manifests (already added), tagged `tag`.
    pub fn add_index(
        &self,
        repo: &str,
        tag: Option<&str>,
        children: &[(&Image, &str)],
    ) -> (String, Bytes) {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": children.iter().map(|(img, arch)| serde_json::json!({
                "mediaType": img.media_type, "digest": img.manifest_digest, "size": img.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"}
            })).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&index).expect("json");
        let d = self.add_manifest(repo, tag, OCI_INDEX, bytes.clone());
        (d, Bytes::from(bytes))
    }

    /// Add an artifact manifest whose `subject` is `subject_digest` (shows up in referrers).
    pub fn add_referrer(
        &self,
        repo: &str,
        subject_digest: &str,
        subject_size: usize,
        artifact_type: &str,
    ) -> String {
        let empty = self.add_blob(repo, Bytes::from_static(b"{}"));
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size},
        });
        self.add_manifest(
            repo,
            None,
            OCI_MANIFEST,
            serde_json::to_vec(&m).expect("json"),
        )
    }

    // ----- faults --------------------------------------------------------

    /// Apply `fault` to every applicable request for `reference` (digest or tag) until cleared.
    pub fn fault(&self, reference: &str, fault: Fault) {
        self.shared.lock().faults.insert(
            reference.to_string(),
            FaultEntry {
                fault,
                remaining: None,
            },
        );
    }
    /// Apply `fault` to the next `times` applicable requests for `reference`, then behave.
    pub fn fault_times(&self, reference: &str, fault: Fault, times: u32) {
        self.shared.lock().faults.insert(
            reference.to_string(),
            FaultEntry {
                fault,
                remaining: Some(times),
            },
        );
    }
    pub fn clear_fault(&self, reference: &str) {
        self.shared.lock().faults.remove(reference);
    }
    /// Send bodies for `reference` in `chunk`-byte pieces with `delay` before each piece.
    pub fn throttle(&self, reference: &str, chunk: usize, delay: Duration) {
        self.shared.lock().throttles.insert(
            reference.to_string(),
            Throttle {
                chunk: chunk.max(1),
                delay,
            },
        );
    }
    pub fn clear_throttle(&self, reference: &str) {
        self.shared.lock().throttles.remove(reference);
    }

    // ----- counting ------------------------------------------------------

    /// Every request received, on both listeners, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }
    pub fn registry_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.host == Host::Registry)
            .collect()
    }
    pub fn redirect_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.host == Host::Redirect)
            .collect()
    }
    pub fn total_requests(&self) -> usize {
        self.shared.lock().requests.len()
    }
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }
    /// Requests on the registry listener with this method whose path ends with `path_suffix`.
    pub fn count(&self, method: &str, path_suffix: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| {
                r.host == Host::Registry
                    && r.method.as_str() == method
                    && r.path.ends_with(path_suffix)
            })
            .count()
    }
    pub fn count_where(&self, f: impl Fn(&Recorded) -> bool) -> usize {
        self.shared.lock().requests.iter().filter(|r| f(r)).count()
    }
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count("GET", &format!("/blobs/{digest}"))
    }
    pub fn blob_heads(&self, digest: &str) -> usize {
        self.count("HEAD", &format!("/blobs/{digest}"))
    }
    /// GETs of `/blobs/` for any digest on the registry listener.
    pub fn blob_gets_total(&self) -> usize {
        self.count_where(|r| {
            r.host == Host::Registry && r.method == Method::GET && r.path.contains("/blobs/")
        })
    }
    pub fn manifest_gets(&self, reference: &str) -> usize {
        self.count("GET", &format!("/manifests/{reference}"))
    }
    pub fn manifest_heads(&self, reference: &str) -> usize {
        self.count("HEAD", &format!("/manifests/{reference}"))
    }
    pub fn manifest_gets_total(&self) -> usize {
        self.count_where(|r| {
            r.host == Host::Registry && r.method == Method::GET && r.path.contains("/manifests/")
        })
    }
    pub fn manifest_heads_total(&self) -> usize {
        self.count_where(|r| {
            r.host == Host::Registry && r.method == Method::HEAD && r.path.contains("/manifests/")
        })
    }
    /// GETs of the blob on the redirect listener.
    pub fn redirect_gets(&self, digest: &str) -> usize {
        self.count_where(|r| {
            r.host == Host::Redirect && r.method == Method::GET && r.path.ends_with(digest)
        })
    }
    /// Requests to the token endpoint, on whichever listener serves it.
    pub fn token_fetches(&self) -> usize {
        self.count_where(|r| r.path == "/token")
    }
    pub fn token_requests(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/token")
            .collect()
    }
    /// Whether any request on the redirect listener carried `Authorization`.
    pub fn redirect_saw_authorization(&self) -> bool {
        self.redirect_requests()
            .iter()
            .any(|r| r.headers.contains_key(hyper::header::AUTHORIZATION))
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.stop_tx.send(true);
    }
}

/// What `add_image` stored.
#[derive(Clone, Debug)]
pub struct Image {
    pub repo: String,
    pub manifest_digest: String,
    pub manifest: Bytes,
    pub media_type: String,
    pub config_digest: String,
    pub config: Bytes,
    /// (digest, bytes)
    pub layers: Vec<(String, Bytes)>,
}

// ---------------------------------------------------------------------------
// Connection handling
// ---------------------------------------------------------------------------

/// What a response may ask of its connection's close.
#[derive(Default)]
struct ConnCtl {
    /// Close with RST instead of FIN.
    rst: AtomicBool,
    /// Bytes to write after everything hyper wrote, just before FIN.
    tail: Mutex<Option<Bytes>>,
}

/// TcpStream that can be told to close with RST instead of FIN, or to
/// write more bytes than hyper did.
struct RstOnDrop {
    inner: TcpStream,
    conn: Arc<ConnCtl>,
}

impl Drop for RstOnDrop {
    fn drop(&mut self) {
        if self.conn.rst.load(Ordering::SeqCst) {
            // Linger 0 makes close() send RST; it does not block.
            #[allow(deprecated)]
            let _ = self.inner.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for RstOnDrop {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for RstOnDrop {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let mut tail = this.conn.tail.lock().unwrap_or_else(|p| p.into_inner());
            let Some(t) = tail.as_mut().filter(|t| !t.is_empty()) else {
                break;
            };
            match Pin::new(&mut this.inner).poll_write(cx, t) {
                Poll::Ready(Ok(n)) if n > 0 => *t = t.slice(n..),
                Poll::Ready(_) => *tail = None, // the peer is gone: just close
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    host: Host,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let mut stop = stop.clone();
                conns.spawn(async move {
                    let ctl = Arc::new(ConnCtl::default());
                    let io = TokioIo::new(RstOnDrop { inner: stream, conn: ctl.clone() });
                    let svc = service_fn(move |req| handle(shared.clone(), host, ctl.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        }
    }
    // Dropping the listener and the JoinSet closes the port and cuts every connection.
}

#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake upstream dropped the connection on purpose")
    }
}
impl std::error::Error for Dropped {}

async fn handle(
    shared: Arc<Shared>,
    host: Host,
    conn: Arc<ConnCtl>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let (parts, body) = req.into_parts();
    // Drain any request body (we never expect one) so keep-alive stays sane.
    let _ = tokio::time::timeout(Duration::from_secs(5), body.collect()).await;
    let down = {
        let mut inner = shared.lock();
        inner.requests.push(Recorded {
            host,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts.headers.clone(),
            at: Instant::now(),
        });
        inner.down
    };
    if down {
        return Err(Box::new(Dropped));
    }
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let headers = parts.headers;
    match host {
        Host::Redirect => {
            serve_redirect_host(&shared, &method, &path, &query, &headers, conn).await
        }
        Host::Registry => serve_registry(&shared, &method, &path, &query, &headers, conn).await,
    }
}

async fn serve_redirect_host(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    conn: Arc<ConnCtl>,
) -> Result<Response<Body>, BoxError> {
    if path == "/token" && shared.opts.realm_on_second_host {
        let query = query.to_string();
        return Ok(token_endpoint(shared, &query, headers));
    }
    let Some(digest) = path.strip_prefix("/cdn/") else {
        return Ok(plain(StatusCode::NOT_FOUND, "not found"));
    };
    if method != Method::GET && method != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"));
    }
    let data = {
        let inner = shared.lock();
        inner
            .blobs
            .iter()
            .find(|((_, d), _)| d == digest)
            .map(|(_, b)| b.clone())
    };
    let Some(data) = data else {
        return Ok(plain(StatusCode::NOT_FOUND, "no such object"));
    };
    let is_get = method == Method::GET;
    let fault = shared.take_fault(&[digest], is_get);
    let throttle = shared.lock().throttles.get(digest).copied();
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    serve_bytes(data, h, headers, is_get, fault, throttle, conn).await
}

async fn serve_registry(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    conn: Arc<ConnCtl>,
) -> Result<Response<Body>, BoxError> {
    if path == "/token" && !shared.opts.realm_on_second_host {
        return Ok(token_endpoint(shared, query, headers));
    }
    if path == "/v2" || path == "/v2/" {
        if let Err(resp) = check_auth(shared, headers, None) {
            return Ok(resp);
        }
        let mut r = json_response(StatusCode::OK, b"{}".to_vec());
        r.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        return Ok(r);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "not a registry path",
        ));
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    enum Ep<'a> {
        Manifest(&'a str),
        Blob(&'a str),
        Tags,
        Referrers(&'a str),
    }
    let (name, ep) = if n >= 3 && segs[n - 2] == "manifests" {
        (segs[..n - 2].join("/"), Ep::Manifest(segs[n - 1]))
    } else if n >= 3 && segs[n - 2] == "blobs" {
        (segs[..n - 2].join("/"), Ep::Blob(segs[n - 1]))
    } else if n >= 3 && segs[n - 2] == "referrers" {
        (segs[..n - 2].join("/"), Ep::Referrers(segs[n - 1]))
    } else if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        (segs[..n - 2].join("/"), Ep::Tags)
    } else {
        return Ok(oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "unknown endpoint",
        ));
    };
    if let Err(resp) = check_auth(shared, headers, Some(&name)) {
        return Ok(resp);
    }
    if method != Method::GET && method != Method::HEAD {
        return Ok(oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the fake is read-only",
        ));
    }
    let is_get = method == Method::GET;
    match ep {
        Ep::Manifest(reference) => {
            let found = {
                let inner = shared.lock();
                let digest = if reference.contains(':') {
                    Some(reference.to_string())
                } else {
                    inner
                        .tags
                        .get(&name)
                        .and_then(|t| t.get(reference))
                        .cloned()
                };
                digest.and_then(|d| {
                    inner
                        .manifests
                        .get(&(name.clone(), d.clone()))
                        .cloned()
                        .map(|m| (d, m))
                })
            };
            let Some((digest, m)) = found else {
                return Ok(oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown",
                ));
            };
            let fault = shared.take_fault(&[reference, &digest], is_get);
            let throttle = {
                let inner = shared.lock();
                inner
                    .throttles
                    .get(reference)
                    .or_else(|| inner.throttles.get(&digest))
                    .copied()
            };
            let mut h = HeaderMap::new();
            h.insert("content-type", hv(&m.media_type));
            h.insert("docker-content-digest", hv(&digest));
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            h.insert("etag", hv(&format!("\"{digest}\"")));
            serve_bytes(m.bytes, h, &HeaderMap::new(), is_get, fault, throttle, conn).await
        }
        Ep::Blob(digest) => {
            let data = shared
                .lock()
                .blobs
                .get(&(name.clone(), digest.to_string()))
                .cloned();
            let Some(data) = data else {
                return Ok(oci_error(
                    StatusCode::NOT_FOUND,
                    "BLOB_UNKNOWN",
                    "blob unknown to registry",
                ));
            };
            if is_get {
                if let (true, Some(raddr)) = (shared.opts.redirect_blobs, shared.redirect_addr) {
                    let loc = format!(
                        "http://{}:{}/cdn/{}",
                        shared.opts.redirect_host,
                        raddr.port(),
                        digest
                    );
                    let mut r = Response::new(empty());
                    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    r.headers_mut().insert("location", hv(&loc));
                    r.headers_mut()
                        .insert("content-length", HeaderValue::from_static("0"));
                    return Ok(r);
                }
            }
            let fault = shared.take_fault(&[digest], is_get);
            let throttle = shared.lock().throttles.get(digest).copied();
            let mut h = HeaderMap::new();
            h.insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert("accept-ranges", HeaderValue::from_static("bytes"));
            h.insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            if shared.opts.blob_digest_header {
                h.insert("docker-content-digest", hv(digest));
            }
            serve_bytes(data, h, headers, is_get, fault, throttle, conn).await
        }
        Ep::Tags => {
            let tags: Option<Vec<String>> = {
                let inner = shared.lock();
                let known = inner.tags.contains_key(&name)
                    || inner.manifests.keys().any(|(r, _)| *r == name);
                known.then(|| {
                    inner
                        .tags
                        .get(&name)
                        .map(|t| t.keys().cloned().collect())
                        .unwrap_or_default()
                })
            };
            let Some(mut tags) = tags else {
                return Ok(oci_error(
                    StatusCode::NOT_FOUND,
                    "NAME_UNKNOWN",
                    "repository name not known to registry",
                ));
            };
            let mut link = None;
            if shared.opts.honor_tag_pagination {
                let q = parse_query(query);
                if let Some(last) = q.iter().find(|(k, _)| k == "last").map(|(_, v)| v.clone()) {
                    tags.retain(|t| *t > last);
                }
                if let Some(n) = q
                    .iter()
                    .find(|(k, _)| k == "n")
                    .and_then(|(_, v)| v.parse::<usize>().ok())
                {
                    if tags.len() > n {
                        tags.truncate(n);
                        if let Some(l) = tags.last() {
                            link = Some(format!(
                                "</v2/{name}/tags/list?last={l}&n={n}>; rel=\"next\""
                            ));
                        }
                    }
                }
            }
            let body =
                serde_json::to_vec(&serde_json::json!({"name": name, "tags": tags})).expect("json");
            let mut r = json_response(StatusCode::OK, body);
            if let Some(l) = link {
                r.headers_mut().insert("link", hv(&l));
            }
            if !is_get {
                *r.body_mut() = empty();
            }
            Ok(r)
        }
        Ep::Referrers(subject) => {
            let q = parse_query(query);
            let filter = q
                .iter()
                .find(|(k, _)| k == "artifactType")
                .map(|(_, v)| v.clone());
            let mut descs: Vec<(String, serde_json::Value)> = Vec::new();
            {
                let inner = shared.lock();
                for ((repo, digest), m) in inner.manifests.iter() {
                    if *repo != name {
                        continue;
                    }
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.bytes) else {
                        continue;
                    };
                    if v["subject"]["digest"].as_str() != Some(subject) {
                        continue;
                    }
                    let at = v["artifactType"]
                        .as_str()
                        .or_else(|| v["config"]["mediaType"].as_str())
                        .unwrap_or("")
                        .to_string();
                    if filter.as_deref().is_some_and(|f| f != at) {
                        continue;
                    }
                    let mut d = serde_json::json!({
                        "mediaType": m.media_type, "digest": digest, "size": m.bytes.len(), "artifactType": at,
                    });
                    if let Some(a) = v.get("annotations") {
                        d["annotations"] = a.clone();
                    }
                    descs.push((digest.clone(), d));
                }
            }
            descs.sort_by(|a, b| a.0.cmp(&b.0));
            let body = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": descs.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
            }))
            .expect("json");
            let mut r = json_response(StatusCode::OK, body);
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static(OCI_INDEX));
            if filter.is_some() {
                r.headers_mut().insert(
                    "oci-filters-applied",
                    HeaderValue::from_static("artifactType"),
                );
            }
            Ok(r)
        }
    }
}

fn check_auth(
    shared: &Shared,
    headers: &HeaderMap,
    repo: Option<&str>,
) -> Result<(), Response<Body>> {
    let auth = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match &shared.opts.auth {
        Auth::None => Ok(()),
        Auth::Basic { username, password } => {
            if basic_matches(auth, username, password) {
                Ok(())
            } else {
                let mut r = oci_error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "authentication required",
                );
                r.headers_mut().insert(
                    "www-authenticate",
                    HeaderValue::from_static("Basic realm=\"fake\""),
                );
                Err(r)
            }
        }
        Auth::Bearer { .. } => {
            let ok = auth.strip_prefix("Bearer ").is_some_and(|tok| {
                let inner = shared.lock();
                inner.tokens.get(tok).is_some_and(|t| {
                    t.expires > Instant::now()
                        && match repo {
                            None => true,
                            Some(_) if !shared.opts.strict_token_scope => true,
                            Some(repo) => t.scopes.iter().any(|s| scope_grants_pull(s, repo)),
                        }
                })
            });
            if ok {
                return Ok(());
            }
            let realm = match (shared.opts.realm_on_second_host, shared.redirect_addr) {
                (true, Some(a)) => {
                    format!("http://{}:{}/token", shared.opts.redirect_host, a.port())
                }
                _ => format!("http://{}/token", shared.addr),
            };
            let mut challenge = format!("Bearer realm=\"{realm}\",service=\"fake\"");
            if let Some(repo) = repo {
                challenge.push_str(&format!(",scope=\"repository:{repo}:pull\""));
            }
            let mut r = oci_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            );
            r.headers_mut().insert("www-authenticate", hv(&challenge));
            Err(r)
        }
    }
}

fn scope_grants_pull(scope: &str, repo: &str) -> bool {
    let Some(rest) = scope.strip_prefix("repository:") else {
        return false;
    };
    let Some((name, actions)) = rest.rsplit_once(':') else {
        return false;
    };
    name == repo && actions.split(',').any(|a| a == "pull" || a == "*")
}

fn basic_matches(auth: &str, user: &str, pass: &str) -> bool {
    let Some(b64) = auth.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64.trim()) else {
        return false;
    };
    raw == format!("{user}:{pass}").as_bytes()
}

fn token_endpoint(shared: &Shared, query: &str, headers: &HeaderMap) -> Response<Body> {
    let Auth::Bearer { basic, expires_in } = &shared.opts.auth else {
        return plain(StatusCode::NOT_FOUND, "no token service");
    };
    if let Some((u, p)) = basic {
        let auth = headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !basic_matches(auth, u, p) {
            return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
        }
    }
    let q = parse_query(query);
    let scopes: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let token = {
        let mut inner = shared.lock();
        inner.token_counter += 1;
        let token = format!("faketoken-{}", inner.token_counter);
        inner.tokens.insert(
            token.clone(),
            Token {
                scopes,
                expires: Instant::now() + Duration::from_secs(*expires_in),
            },
        );
        token
    };
    let body = match shared.opts.token_field {
        TokenField::Both => {
            serde_json::json!({"token": token, "access_token": token, "expires_in": expires_in})
        }
        TokenField::Token => serde_json::json!({"token": token, "expires_in": expires_in}),
        TokenField::AccessToken => {
            serde_json::json!({"access_token": token, "expires_in": expires_in})
        }
    };
    json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"))
}

/// Serve `data` (a blob or manifest) honouring Range, a fault and a throttle.
async fn serve_bytes(
    data: Bytes,
    mut h: HeaderMap,
    req_headers: &HeaderMap,
    is_get: bool,
    fault: Option<Fault>,
    throttle: Option<Throttle>,
    conn: Arc<ConnCtl>,
) -> Result<Response<Body>, BoxError> {
    match &fault {
        Some(Fault::Drop) => return Err(Box::new(Dropped)),
        Some(Fault::SlowHeaders { delay }) => tokio::time::sleep(*delay).await,
        Some(Fault::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code_str = match *code {
                429 => "TOOMANYREQUESTS",
                _ => "UNAVAILABLE",
            };
            let mut r = oci_error(status, code_str, "injected fault");
            if let Some(s) = retry_after {
                r.headers_mut().insert("retry-after", hv(&s.to_string()));
            }
            if !is_get {
                *r.body_mut() = empty();
            }
            return Ok(r);
        }
        _ => {}
    }
    let total = data.len();
    let range = req_headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(|s| parse_range(s, total));
    let (status, mut slice) = match range {
        None | Some(RangeSpec::Ignore) => (StatusCode::OK, data),
        Some(RangeSpec::Unsatisfiable) => {
            let mut r = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "unsatisfiable range",
            );
            r.headers_mut()
                .insert("content-range", hv(&format!("bytes */{total}")));
            return Ok(r);
        }
        Some(RangeSpec::Range(a, b)) => {
            h.insert("content-range", hv(&format!("bytes {a}-{b}/{total}")));
            (StatusCode::PARTIAL_CONTENT, data.slice(a..=b))
        }
    };
    if let Some(Fault::UnderstatedLength { by }) = fault {
        // hyper never writes past Content-Length: the rest goes out at close.
        let declared = slice.len().saturating_sub(by);
        *conn.tail.lock().unwrap_or_else(|p| p.into_inner()) = Some(slice.slice(declared..));
        h.insert("connection", HeaderValue::from_static("close"));
        slice = slice.slice(..declared);
    }
    h.insert("content-length", hv(&slice.len().to_string()));
    let body = if !is_get {
        empty()
    } else if fault.is_none() && throttle.is_none() {
        Full::new(slice)
            .map_err(|never: Infallible| match never {})
            .boxed()
    } else {
        streamed_body(slice, fault, throttle, conn)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    *r.headers_mut() = h;
    Ok(r)
}

fn streamed_body(
    slice: Bytes,
    fault: Option<Fault>,
    throttle: Option<Throttle>,
    conn: Arc<ConnCtl>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tokio::spawn(async move {
        let mut data = slice.to_vec();
        let len = data.len();
        if let Some(Fault::WrongByte { at }) = fault {
            if len > 0 {
                data[at.min(len - 1)] ^= 0x5a;
            }
        }
        let limit = match fault {
            Some(Fault::Reset { after })
            | Some(Fault::Truncate { after })
            | Some(Fault::Stall { after, .. }) => after.min(len),
            _ => len,
        };
        let chunk = throttle.map(|t| t.chunk).unwrap_or(64 * 1024);
        let mut pos = 0;
        while pos < limit {
            if let Some(t) = throttle {
                tokio::time::sleep(t.delay).await;
            }
            let end = (pos + chunk).min(limit);
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(&data[pos..end]))))
                .await
                .is_err()
            {
                return; // the client went away
            }
            pos = end;
        }
        match fault {
            Some(Fault::Reset { .. }) => {
                // Let what was sent reach the peer before the RST discards the send buffer.
                tokio::time::sleep(Duration::from_millis(50)).await;
                conn.rst.store(true, Ordering::SeqCst);
                let _ = tx.send(Err("injected reset".into())).await;
            }
            Some(Fault::Truncate { .. }) => {
                // Ending the body early makes hyper close the connection (FIN)
                // because Content-Length promised more.
            }
            Some(Fault::Stall { hold, .. }) => {
                tokio::select! {
                    _ = tokio::time::sleep(hold) => {}
                    _ = tx.closed() => return,
                }
                let _ = tx.send(Err("injected stall ended".into())).await;
            }
            _ => {}
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

enum RangeSpec {
    Ignore,
    Unsatisfiable,
    Range(usize, usize),
}

fn parse_range(s: &str, total: usize) -> RangeSpec {
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore; // multi-range: serve the whole thing, as many registries do
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(suffix) = b.parse::<usize>() else {
            return RangeSpec::Ignore;
        };
        if suffix == 0 || total == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Range(total.saturating_sub(suffix), total - 1);
    }
    let Ok(start) = a.parse::<usize>() else {
        return RangeSpec::Ignore;
    };
    let end = if b.is_empty() {
        total.saturating_sub(1)
    } else {
        match b.parse::<usize>() {
            Ok(e) => e.min(total.saturating_sub(1)),
            Err(_) => return RangeSpec::Ignore,
        }
    };
    if start >= total || (!b.is_empty() && b.parse::<usize>().map(|e| e < start).unwrap_or(true)) {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Range(start, end)
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header value")
}

fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg.to_string()))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("text/plain"));
    r
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        HeaderName::from_static("content-length"),
        hv(&len.to_string()),
    );
    r
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::to_vec(
        &serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
    )
    .expect("json");
    json_response(status, body)
}
