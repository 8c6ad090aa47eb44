//! wharf: a pull-through caching proxy for container registries.
//!
//! [`start`] wires the pieces together: configuration, the cache on disk,
//! one client per upstream, the API, and the HTTP server.

pub mod access;
pub mod admin;
pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod digest;
pub mod fleet;
pub mod index;
pub mod manifest;
pub mod metrics;
pub mod server;
pub mod store;
pub mod upstream;
pub mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;

const ACCESS_FLUSH_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {dir}: {source}")]
    Cache {
        dir: String,
        source: cache::CacheError,
    },
    #[error("upstream {name}: {reason}")]
    Upstream { name: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] server::tls::TlsError),
    #[error("auth.htpasswd: {0}")]
    Htpasswd(String),
    #[error("storage bucket: {0}")]
    Bucket(String),
}

/// A running server; dropping it without [`RunningServer::shutdown`]
/// leaves it running until the runtime ends.
pub struct RunningServer {
    local_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_stop: tokio::sync::oneshot::Sender<()>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    api: Arc<api::Api>,
    tls: Option<Arc<server::tls::TlsFiles>>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS files, to reload on SIGHUP: open connections keep their
    /// certificate, new handshakes get the new one.
    pub fn tls(&self) -> Option<Arc<server::tls::TlsFiles>> {
        self.tls.clone()
    }

    /// Client authentication and policy, to re-read the htpasswd file on SIGHUP.
    pub fn access(&self) -> Arc<access::Access> {
        self.api.access().clone()
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, lets open responses finish (bounded), discards
    /// unfinished fills, and releases the data dir.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        let _ = self.admin_stop.send(());
        self.api.cache().abort_fills();
        self.api.cache().flush();
        // Fill tasks and connections hold the cache; wait for them to let go
        // so the index file is closed when this returns.
        let mut api = self.api;
        for _ in 0..500 {
            match Arc::try_unwrap(api) {
                Ok(api) => {
                    drop(api);
                    return;
                }
                Err(still_shared) => api = still_shared,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!("shutdown: some tasks still hold the cache after 5 s");
    }
}

/// Last-access times and counters are kept in memory and written in
/// batches, so a cache hit costs no disk write.
async fn flush_periodically(cache: std::sync::Weak<cache::Cache>) {
    let mut tick = tokio::time::interval(ACCESS_FLUSH_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(cache) = cache.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || cache.flush()).await;
    }
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listen_error = |source| StartError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(listen_error)?;
    let local = listener.local_addr().map_err(listen_error)?;
    Ok((listener, local))
}

/// Opens the cache, builds the upstream clients, binds and starts serving.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    let dir = config.storage.dir.clone();
    let cache_config = config.cache.clone();
    let storage = &config.storage;
    let limits = store::Limits {
        max_size: storage.max_size,
        high: (storage.max_size as f64 * storage.high_watermark) as u64,
        low: (storage.max_size as f64 * storage.low_watermark) as u64,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let cache_metrics = metrics.clone();
    let max_fills = config.limits.max_fills;
    let fleet = match &config.storage.s3 {
        Some(s3) => {
            let fleet = fleet::Fleet::new(s3).map_err(StartError::Bucket)?;
            tracing::info!(bucket = %s3.bucket, prefix = %s3.prefix, lease = s3.lease, "sharing blobs with the fleet through a bucket");
            Some(Arc::new(fleet))
        }
        None => None,
    };
    let cache = tokio::task::spawn_blocking(move || {
        cache::Cache::open(&dir, cache_config, limits, max_fills, fleet, cache_metrics)
    })
    .await
    .expect("cache open does not panic")
    .map_err(|source| StartError::Cache {
        dir: config.storage.dir.display().to_string(),
        source,
    })?;
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| {
            upstream::Upstream::new(u.clone(), metrics.clone())
                .map(Arc::new)
                .map_err(|reason| StartError::Upstream {
                    name: u.name.clone(),
                    reason,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let access = Arc::new(access::Access::new(&config).map_err(StartError::Htpasswd)?);
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(server::tls::TlsFiles::load(cert, key)?)),
        _ => None,
    };
    for u in config.upstreams.iter().filter(|u| u.insecure_skip_verify) {
        tracing::warn!(
            upstream = %u.name,
            "INSECURE: TLS certificates of this upstream are NOT verified (insecure_skip_verify = true); anyone on the path can serve content in its name"
        );
    }
    let (listener, local_addr) = bind(config.server.listen).await?;
    let (admin_listener, admin_addr) = bind(config.server.admin_listen).await?;
    let grace = config.server.shutdown_grace;
    let cache = Arc::new(cache);
    let (count, bytes) = cache.usage();
    tracing::info!(
        blobs = count,
        bytes,
        max_size = limits.max_size,
        "cache opened"
    );
    tokio::spawn(flush_periodically(Arc::downgrade(&cache)));
    let limits = &config.limits;
    let refused_metrics = metrics.clone();
    let api_limits = server::Limits {
        max_connections: limits.max_connections,
        header_timeout: limits.header_timeout,
        max_head_size: limits.max_header_size + limits.max_url_length + 256,
        on_refused: Arc::new(move || refused_metrics.reject("connection_limit")),
    };
    let admin_limits = server::Limits {
        max_connections: 64,
        max_head_size: 8192,
        on_refused: Arc::new(|| ()),
        ..api_limits.clone()
    };
    let api = Arc::new(api::Api::new(config, upstreams, cache, access, metrics));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service_api = api.clone();
    let task = tokio::spawn(server::serve(
        "api",
        listener,
        tls.clone(),
        api_limits,
        move |req| service_api.clone().handle(req),
        async {
            let _ = stopped.await;
        },
        grace,
    ));
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_api = api.clone();
    tokio::spawn(server::serve(
        "admin",
        admin_listener,
        None,
        admin_limits,
        move |req| api::ops::handle(admin_api.clone(), req),
        async {
            let _ = admin_stopped.await;
        },
        Duration::from_secs(1),
    ));
    Ok(RunningServer {
        local_addr,
        admin_addr,
        admin_stop,
        stop,
        task,
        api,
        tls,
    })
}
