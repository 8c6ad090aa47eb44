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
    B: hyper::body::Body + Send + 'static,
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
        .max_header_list_size(u32::try_from(limits.max_head_size).unwrap_or(u32::MAX));
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
        let svc = service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let fut = service(req);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let handshake_timeout = limits.header_timeout.min(HANDSHAKE_TIMEOUT);
        tokio::spawn(async move {
            let _permit = permit;
            let result = match acceptor {
                None => {
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
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "all connections drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, grace_s = grace.as_secs(), "shutdown grace period over; closing remaining connections"),
    }
}
