//! Single-flight blob fills. The first miss on a digest starts one upstream
//! fetch, written to a temp file and hashed as it arrives; every client of
//! that digest reads the growing file. A client hanging up never cancels a
//! fill; only shutdown does.

use super::links::link_key;
use super::shared::{Origin, Source};
use super::{Cache, CacheError};
use crate::digest::Digest;
use crate::metrics::GaugeGuard;
use crate::store::{stream_range, Kind, Pin, Progress, TempBlob};
use crate::upstream::{Upstream, UpstreamError};
use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// Bytes gathered from upstream before one write: few syscalls when data
/// streams fast, no waiting when it trickles.
const WRITE_BATCH: usize = 1 << 20;

pub(super) struct Fill {
    /// Keeps the digest from eviction for as long as the fill exists.
    _pin: Pin,
    progress: watch::Receiver<Progress>,
    file: Arc<File>,
    /// The typed reason, set before `Progress::Failed` is published.
    failure: OnceLock<Arc<CacheError>>,
    task: OnceLock<tokio::task::AbortHandle>,
}

impl Fill {
    pub(super) fn abort(&self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// How a fill ended well.
enum Filled {
    /// Committed to the store.
    Kept(u64),
    /// Verified and served, but larger than the whole budget.
    Passed(u64),
}

/// Where a blob answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobSource {
    /// Committed on disk.
    Hit,
    /// Being fetched from upstream right now (this request started or joined it).
    Fill,
}

/// An open blob: committed, or still being filled. Pinned against
/// eviction until it and its stream are dropped.
pub struct Blob {
    file: Arc<File>,
    pin: Pin,
    /// For a fill: counts this client in `wharf_fill_clients`.
    attached: Option<GaugeGuard>,
    progress: Option<watch::Receiver<Progress>>,
    /// The full length, once known.
    len: Option<u64>,
    pub source: BlobSource,
}

impl Blob {
    pub fn len_if_known(&self) -> Option<u64> {
        self.len
    }

    /// The full length; for a fill whose upstream sent no Content-Length
    /// this waits until the fill completes.
    pub async fn total_len(&mut self) -> Result<u64, CacheError> {
        if let Some(len) = self.len {
            return Ok(len);
        }
        let rx = self.progress.as_mut().expect("only fills lack a length");
        loop {
            match &*rx.borrow_and_update() {
                Progress::Verified { len } => {
                    self.len = Some(*len);
                    return Ok(*len);
                }
                Progress::Failed(reason) => return Err(CacheError::FillFailed(reason.to_string())),
                Progress::Connecting | Progress::Writing { .. } => {}
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::FillFailed("fill abandoned".into()));
            }
        }
    }

    /// Bytes `start..end`, waiting for them if the blob is still filling.
    pub fn stream(
        self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        stream_range(
            self.file,
            start,
            end,
            self.progress,
            (self.pin, self.attached),
        )
    }
}

impl Cache {
    /// Opens `digest` from disk, or joins or starts its fill from `upstream`.
    /// Content already here (on disk or arriving for another repository)
    /// is served to `repo` only once it is known to reference it.
    /// Returns once upstream has answered, so a failure before the first
    /// byte is a proper error rather than a cut connection.
    pub async fn blob(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Blob, CacheError> {
        let negative_key = link_key(upstream.name(), repo, digest);
        let mut authorized = self.is_linked(&negative_key)?;
        let (fill, pin) = loop {
            if let Some(blob) = self.committed_blob(digest)? {
                if !authorized {
                    self.authorize(upstream, repo, digest, Kind::Blob).await?;
                }
                return Ok(blob);
            }
            if let Some(reason) = self.storage_trouble() {
                return Err(CacheError::StorageUnavailable(reason));
            }
            if self.negative.contains_key(&negative_key) {
                return Err(CacheError::upstream(upstream, UpstreamError::NotFound));
            }
            let pin = self.budget.pin(digest);
            let fill = {
                let mut fills = self.fills.lock().expect("fills lock");
                match fills.get(digest) {
                    Some(fill) if authorized => Some(fill.clone()),
                    // Arriving for another repository: authorize first.
                    Some(_) => None,
                    // Committed since the check above: go round again.
                    None if self.store.contains(Kind::Blob, digest) => None,
                    None if fills.len() >= self.max_fills => {
                        return Err(CacheError::TooManyFills {
                            limit: self.max_fills,
                        })
                    }
                    None => {
                        let fill = self.start_fill(upstream, repo, digest)?;
                        fills.insert(digest.clone(), fill.clone());
                        Some(fill)
                    }
                }
            };
            match fill {
                Some(fill) => break (fill, pin),
                None if !authorized => {
                    self.authorize(upstream, repo, digest, Kind::Blob).await?;
                    authorized = true;
                }
                None => {}
            }
        };
        let mut rx = fill.progress.clone();
        loop {
            let len = match &*rx.borrow_and_update() {
                Progress::Connecting => None,
                Progress::Writing { total, .. } => Some(*total),
                Progress::Verified { len } => Some(Some(*len)),
                Progress::Failed(reason) => {
                    let error = match fill.failure.get() {
                        Some(e) => e.clone(),
                        None => return Err(CacheError::FillFailed(reason.to_string())),
                    };
                    if matches!(
                        *error,
                        CacheError::Upstream {
                            error: UpstreamError::NotFound,
                            ..
                        }
                    ) {
                        self.negative.insert(negative_key, ());
                    }
                    return Err(CacheError::Shared(error));
                }
            };
            if let Some(len) = len {
                return Ok(Blob {
                    file: fill.file.clone(),
                    pin,
                    attached: Some(GaugeGuard::new(&self.metrics.fill_clients)),
                    progress: Some(rx),
                    len,
                    source: BlobSource::Fill,
                });
            }
            if rx.changed().await.is_err() {
                return Err(CacheError::FillFailed("fill abandoned".into()));
            }
        }
    }

    /// The length of `digest` without fetching it: from disk or from a
    /// fill in flight if `repo` is known to reference it, else from an
    /// upstream HEAD.
    pub async fn blob_len(
        &self,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, CacheError> {
        let link = link_key(upstream.name(), repo, digest);
        if !self.is_linked(&link)? {
            let len = upstream
                .head_blob(repo, digest)
                .await
                .map_err(|e| CacheError::upstream(upstream, e))?;
            self.add_links(vec![link]);
            return Ok(len);
        }
        if let Some((_, len)) = self.store.open_file(Kind::Blob, digest)? {
            return Ok(Some(len));
        }
        let in_flight = self.fills.lock().expect("fills lock").get(digest).cloned();
        if let Some(fill) = in_flight {
            match &*fill.progress.borrow() {
                Progress::Writing {
                    total: Some(len), ..
                }
                | Progress::Verified { len } => return Ok(Some(*len)),
                _ => {}
            }
        }
        upstream
            .head_blob(repo, digest)
            .await
            .map_err(|e| CacheError::upstream(upstream, e))
    }

    fn committed_blob(&self, digest: &Digest) -> Result<Option<Blob>, CacheError> {
        // Pin before opening, so eviction cannot pick it in between.
        let pin = self.budget.pin(digest);
        let Some((file, len)) = self.store.open_file(Kind::Blob, digest)? else {
            return Ok(None);
        };
        self.budget.touch(digest);
        Ok(Some(Blob {
            file,
            pin,
            attached: None,
            progress: None,
            len: Some(len),
            source: BlobSource::Hit,
        }))
    }

    fn start_fill(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Arc<Fill>, CacheError> {
        let temp = self.store.create_temp(digest).map_err(|e| {
            self.note_storage_trouble(&e);
            CacheError::StorageUnavailable(e.to_string())
        })?;
        let (tx, rx) = watch::channel(Progress::Connecting);
        let fill = Arc::new(Fill {
            _pin: self.budget.pin(digest),
            progress: rx,
            file: temp.reader()?,
            failure: OnceLock::new(),
            task: OnceLock::new(),
        });
        let task = tokio::spawn(self.clone().run_fill(
            upstream.clone(),
            repo.to_owned(),
            digest.clone(),
            temp,
            tx,
            fill.clone(),
        ));
        let _ = fill.task.set(task.abort_handle());
        Ok(fill)
    }

    async fn run_fill(
        self: Arc<Self>,
        upstream: Arc<Upstream>,
        repo: String,
        digest: Digest,
        temp: TempBlob,
        tx: watch::Sender<Progress>,
        fill: Arc<Fill>,
    ) {
        let started = std::time::Instant::now();
        let _in_flight = GaugeGuard::new(&self.metrics.fills_in_flight);
        let (outcome, origin, lease) = match self.open_source(&upstream, &repo, &digest).await {
            Ok(mut source) => {
                let lease = source.lease.take();
                let origin = source.origin;
                let outcome = self.fetch_into(&upstream, &digest, temp, &tx, source).await;
                (outcome, Some(origin), lease)
            }
            Err(e) => (Err(e), None, None),
        };
        if let Some(origin) = origin {
            self.metrics.fill(origin.as_str());
        }
        match outcome {
            Ok(Filled::Kept(len)) => {
                self.budget.add(&digest, len);
                if let Err(e) = self.index.put_blob(&digest, len) {
                    // The file is committed and the index is rebuilt from files at start.
                    tracing::error!(%digest, error = %e, "blob committed but not indexed");
                }
                tracing::info!(
                    upstream = upstream.name(), repo, %digest, bytes = len,
                    source = origin.map_or("-", Origin::as_str),
                    ms = started.elapsed().as_millis() as u64, "blob fill committed"
                );
                if origin == Some(Origin::Upstream) {
                    self.share(digest.clone(), lease);
                } else {
                    self.release_lease(lease);
                }
                let cache = self.clone();
                let _ = tokio::task::spawn_blocking(move || cache.enforce_budget()).await;
            }
            Ok(Filled::Passed(len)) => {
                self.release_lease(lease);
                tracing::warn!(
                    upstream = upstream.name(), repo, %digest, bytes = len,
                    max_size = self.budget.limits().max_size,
                    "blob is larger than the whole cache budget: streamed, verified, not kept"
                );
            }
            Err(e) => {
                self.release_lease(lease);
                if let CacheError::Storage(io) = &e {
                    self.note_storage_trouble(io);
                }
                tracing::warn!(upstream = upstream.name(), repo, %digest, error = %e, "blob fill failed; nothing committed");
                let reason: Arc<str> = e.to_string().into();
                let _ = fill.failure.set(Arc::new(e));
                tx.send_replace(Progress::Failed(reason));
            }
        }
        self.fills.lock().expect("fills lock").remove(&digest);
    }

    async fn fetch_into(
        &self,
        upstream: &Upstream,
        digest: &Digest,
        temp: TempBlob,
        tx: &watch::Sender<Progress>,
        source: Source,
    ) -> Result<Filled, CacheError> {
        let upstream_err = |e| CacheError::upstream(upstream, e);
        let total = source.total;
        tx.send_replace(Progress::Writing { written: 0, total });
        let mut body = source.body;
        // One write is in flight while the next batch arrives, so the fill
        // runs at the pace of the slower of network and disk, not their sum.
        let mut writer = Some(temp);
        let mut in_flight: Option<WriteTask> = None;
        let stalled = || match source.origin {
            Origin::Upstream => upstream_err(UpstreamError::Timeout("body data")),
            Origin::Bucket => CacheError::Bucket("no data within read_timeout".into()),
        };
        while let Some(batch) = next_batch(&mut body, upstream.config.read_timeout, stalled).await?
        {
            if source.origin == Origin::Upstream {
                upstream.count_fetched(batch.iter().map(Bytes::len).sum());
            }
            if let Some(task) = in_flight.take() {
                writer = Some(self.finish_write(task, total, tx, upstream).await?);
            }
            let mut w = writer.take().expect("writer idle between writes");
            in_flight = Some(tokio::task::spawn_blocking(move || {
                let result = batch.iter().try_for_each(|chunk| w.append(chunk));
                (w, result)
            }));
        }
        let mut writer = match in_flight {
            Some(task) => self.finish_write(task, total, tx, upstream).await?,
            None => writer.take().expect("writer idle after the body"),
        };
        if let Some(total) = total {
            if writer.written() != total {
                return Err(upstream_err(UpstreamError::Body(format!(
                    "body ended after {} of {total} bytes",
                    writer.written()
                ))));
            }
        }
        let (writer, verified) = blocking(move || {
            let verified = writer.verify();
            (writer, verified)
        })
        .await?;
        let len = verified.map_err(|e| CacheError::from_commit(upstream, e))?;
        // Readers get their last byte only once the blob is durable, so a
        // completed pull means a committed blob, even across a crash.
        let filled = if self.budget.fits(len) {
            let dest = self.store.path(Kind::Blob, digest);
            blocking(move || writer.persist(&dest)).await??;
            Filled::Kept(len)
        } else {
            Filled::Passed(len)
        };
        tx.send_replace(Progress::Verified { len });
        Ok(filled)
    }

    /// Waits for a write, checks it against the announced length, and
    /// tells readers how far the file goes.
    async fn finish_write(
        &self,
        task: WriteTask,
        total: Option<u64>,
        tx: &watch::Sender<Progress>,
        upstream: &Upstream,
    ) -> Result<TempBlob, CacheError> {
        let (writer, result) = task
            .await
            .map_err(|e| CacheError::Storage(io::Error::other(e)))?;
        result?;
        let written = writer.written();
        if let Some(total) = total.filter(|total| written > *total) {
            return Err(CacheError::upstream(
                upstream,
                UpstreamError::Protocol(format!(
                    "blob body is longer than its Content-Length {total}"
                )),
            ));
        }
        tx.send_replace(Progress::Writing { written, total });
        Ok(writer)
    }
}

type WriteTask = tokio::task::JoinHandle<(TempBlob, io::Result<()>)>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Storage(io::Error::other(e)))
}

/// The next chunks of a fill: waits (up to `read_timeout`) for one, then
/// takes whatever else is already there, up to [`WRITE_BATCH`] bytes.
async fn next_batch(
    body: &mut (impl Stream<Item = Result<Bytes, CacheError>> + Unpin),
    read_timeout: std::time::Duration,
    stalled: impl Fn() -> CacheError,
) -> Result<Option<Vec<Bytes>>, CacheError> {
    let first = match tokio::time::timeout(read_timeout, body.next()).await {
        Err(_) => return Err(stalled()),
        Ok(None) => return Ok(None),
        Ok(Some(chunk)) => chunk?,
    };
    let mut batch_len = first.len();
    let mut batch = vec![first];
    while batch_len < WRITE_BATCH {
        match body.next().now_or_never() {
            Some(Some(chunk)) => {
                let chunk = chunk?;
                batch_len += chunk.len();
                batch.push(chunk);
            }
            Some(None) | None => break,
        }
    }
    Ok(Some(batch))
}
