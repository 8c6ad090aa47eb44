//! The HTTP server: accepts TCP connections, optionally terminates TLS,
//! speaks HTTP/1.1 and HTTP/2 via hyper-util, and drains in-flight requests
//! on shutdown within a grace period. Bounds what a connection may take
//! before the service sees a request: open connections, time to send
//! headers, and header bytes. Knows nothing of registries or OCI: it runs
//! whatever service it is handed, telling it the peer's address.

pub mod tls;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's address, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// What one listener allows its connections.
#[derive(Clone)]
pub struct Limits {
    /// Open connections; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time to send a request's headers (HTTP/1) or finish the TLS handshake.
    pub header_timeout: Duration,
    /// Bytes of request line plus headers that are read at all; hyper
    /// answers 431 beyond it. The service applies its own, finer limits.
    pub max_head_size: usize,
    /// Told when a connection is refused for being one too many.
    pub on_refused: Arc<dyn Fn() + Send + Sync>,
}

/// How often an idle HTTP/2 connection is pinged.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// hyper's smallest allowed read buffer.
const MIN_HEAD_BUFFER: usize = 8192;

/// Serves `listener` until `shutdown` resolves, then waits up to `grace`
/// for open requests to finish. With `tls`, every connection is TLS.
/// `name` tells the listeners apart in logs.
pub async fn serve<S, F, B>(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<tls::TlsFiles>>,
    limits: Limits,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_head_size.max(MIN_HEAD_BUFFER));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_head_size).unwrap_or(u32::MAX))
        // Drops HTTP/2 peers that stop answering pings.
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(limits.header_timeout);
    // On shutdown, connections with no request in flight are dropped at
    // once, and the rest when the grace period ends.
    let (phase_tx, phase) = tokio::sync::watch::channel(Phase::Serving);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut last_refusal_log: Option<std::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            (limits.on_refused)();
            // One line a second at most: a flood must not flood the log too.
            if last_refusal_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                tracing::warn!(listener = name, %peer, max_connections = limits.max_connections, "connection limit reached; closing new connections");
                last_refusal_log = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let activity = Arc::new(Activity::default());
        let counter = activity.clone();
        let svc = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let guard = InFlight::new(&counter);
            let fut = service(req);
            async move {
                let resp = fut.await;
                Ok::<_, Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _guard: guard,
                }))
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let header_timeout = limits.header_timeout;
        let handshake_timeout = header_timeout.min(HANDSHAKE_TIMEOUT);
        let mut phase = phase.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = async {
                match acceptor {
                    None => {
                        // hyper's header timeout starts only once it knows the
                        // protocol; a silent peer must not hold a slot until then.
                        if !first_bytes_arrive(&stream, header_timeout).await {
                            tracing::debug!(%peer, "no request within header_timeout; closing");
                            return Ok(());
                        }
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                        let stream = match handshake.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return Ok(());
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return Ok(());
                            }
                        };
                        // ALPN already chose the protocol: no sniffing, so
                        // HTTP/1's header timeout runs from the start.
                        let builder = match stream.get_ref().1.alpn_protocol() {
                            Some(b"h2") => builder.http2_only(),
                            _ => builder.http1_only(),
                        };
                        let conn = builder.serve_connection(TokioIo::new(stream), svc);
                        watcher.watch(conn.into_owned()).await
                    }
                }
            };
            tokio::select! {
                result = served => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = idle_at_shutdown(&mut phase, &activity) => {}
                () = activity.idle_for(header_timeout) => {
                    tracing::debug!(%peer, "no request for header_timeout; closing");
                }
            }
        });
    }
    drop(listener);
    let _ = phase_tx.send(Phase::Draining);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, grace_s = grace.as_secs(), "shutdown grace period over; closing remaining connections");
            let _ = phase_tx.send(Phase::Closing);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Shutting down: finish what is in flight.
    Draining,
    /// The grace period is over.
    Closing,
}

/// Resolves when shutdown begins while the connection has no request in
/// flight (a silent peer, half a request head, an idle HTTP/2 session), or
/// when the grace period is over. A connection busy at shutdown is left to
/// hyper's graceful close, so the end of its response is never cut.
async fn idle_at_shutdown(phase: &mut tokio::sync::watch::Receiver<Phase>, activity: &Activity) {
    if phase.wait_for(|p| *p != Phase::Serving).await.is_err() {
        return std::future::pending().await;
    }
    if activity.in_flight.load(Ordering::Acquire) == 0 {
        return;
    }
    let _ = phase.wait_for(|p| *p == Phase::Closing).await;
}

/// A connection's requests in flight, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last_ended: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ended: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Activity {
    /// Resolves once the connection has had no request in flight for
    /// `limit`: an HTTP/2 session (or anything hyper keeps open) that only
    /// holds a connection slot is closed, as an idle HTTP/1 one is.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let idle = match self.in_flight.load(Ordering::Acquire) {
                0 => self.last_ended.lock().expect("activity lock").elapsed(),
                _ => Duration::ZERO,
            };
            if idle >= limit {
                return;
            }
            tokio::time::sleep((limit - idle).max(Duration::from_millis(100))).await;
        }
    }
}

/// Counts one request, from its head until its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_ended.lock().expect("activity lock") = std::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted until it is dropped.
struct Tracked<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Waits (at most `within`) until the peer has sent enough to tell HTTP/1
/// from HTTP/2: any byte that is not the start of the HTTP/2 preface, or
/// the whole preface. False if the peer stays silent or goes away.
async fn first_bytes_arrive(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let sniff = async {
        let mut buf = [0u8; PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == PREFACE.len() || buf[..n] != PREFACE[..n] => return true,
                // Part of the preface: peek returns at once while data is
                // pending, so wait a little for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(within, sniff).await.unwrap_or(false)
}
