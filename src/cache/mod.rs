//! Pull-through policy: what is answered from disk, what goes upstream, and
//! when. Digest references are immutable and never go upstream twice; tags
//! are served without an upstream call inside `tag_ttl`, revalidated with a
//! HEAD after it, and served stale up to `stale_if_error` while upstream is
//! failing. Blob misses are single-flight fills (see [`fill`]).
//! Knows nothing of HTTP requests or responses.

mod fill;
mod links;
mod shared;

pub use fill::{Blob, BlobSource};

use crate::api::route::Reference;
use crate::config::CacheConfig;
use crate::digest::Digest;
use crate::index::{unix_ms, Index, IndexError, TagRecord};
use crate::metrics::Metrics;
use crate::store::{Budget, CommitError, Kind, Limits, Store};
use crate::upstream::{FetchedManifest, Upstream, UpstreamError, MANIFEST_TYPES};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("upstream {upstream}: {error}")]
    Upstream {
        upstream: String,
        error: UpstreamError,
    },
    #[error("upstream {upstream} sent content hashing to {actual}, not {expected}")]
    DigestMismatch {
        upstream: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("storage: {0}")]
    Storage(#[from] io::Error),
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A fill that other requests share failed; the first reason is inside.
    #[error("{0}")]
    Shared(Arc<CacheError>),
    #[error("blob fill failed: {0}")]
    FillFailed(String),
    /// The disk cannot take new blobs right now (full, read-only…).
    #[error("cache storage unavailable: {0}")]
    StorageUnavailable(String),
    #[error("{limit} blob fills from upstream are already running; retry shortly")]
    TooManyFills { limit: usize },
    /// Reading a blob from the fleet's shared bucket failed.
    #[error("shared bucket: {0}")]
    Bucket(String),
}

impl CacheError {
    fn upstream(upstream: &Upstream, error: UpstreamError) -> CacheError {
        CacheError::Upstream {
            upstream: upstream.name().to_owned(),
            error,
        }
    }

    fn from_commit(upstream: &Upstream, e: CommitError) -> CacheError {
        match e {
            CommitError::Mismatch { expected, actual } => CacheError::DigestMismatch {
                upstream: upstream.name().to_owned(),
                expected,
                actual,
            },
            CommitError::Io(e) => CacheError::Storage(e),
        }
    }
}

/// A manifest exactly as upstream sent it.
#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// How a manifest answer was obtained, for logs and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// From cache, with no upstream request.
    Hit,
    /// Upstream confirmed the cached digest with a HEAD.
    Revalidated,
    /// Fetched from upstream now.
    Fetched,
    /// Upstream failed; this is the last confirmed answer.
    Stale { reason: String },
}

#[derive(Debug, Clone)]
struct TagEntry {
    digest: Digest,
    media_type: String,
    confirmed: SystemTime,
}

pub struct Cache {
    config: CacheConfig,
    store: Store,
    index: Index,
    fills: Mutex<HashMap<Digest, Arc<fill::Fill>>>,
    manifests: moka::sync::Cache<Digest, Arc<Manifest>>,
    tags: RwLock<HashMap<String, TagEntry>>,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    /// Recent upstream 404s (`upstream/repo@reference`), so a storm of
    /// pulls of something missing asks upstream once.
    negative: moka::sync::Cache<String, ()>,
    /// Known `upstream/repo@digest` links (see [`links`]).
    links: moka::sync::Cache<String, ()>,
    /// Fills allowed at once.
    max_fills: usize,
    /// The bucket replicas share, when configured.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// When and why the disk last refused a write; misses bypass the
    /// store for [`STORAGE_BACKOFF`] after it.
    storage_trouble: Mutex<Option<(std::time::Instant, String)>>,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    started_ms: u64,
    /// Serialises upstream work per tag, so a storm of pulls of one stale
    /// tag makes one upstream request.
    tag_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub const INDEX_FILE: &str = "index.redb";

/// A tag revalidation has a cached answer to fall back on, so it waits no
/// longer than this for upstream (and never past `response_timeout`).
const REVALIDATE_PATIENCE: Duration = Duration::from_secs(5);

/// How long misses stream straight from upstream after the disk refused a write.
const STORAGE_BACKOFF: Duration = Duration::from_secs(30);

/// Memory held by parsed manifests; more live on disk.
const MANIFEST_MEMORY: u64 = 64 << 20;

impl Cache {
    /// Opens the store and index under `dir` and reconciles them.
    pub fn open(
        dir: &std::path::Path,
        config: CacheConfig,
        limits: Limits,
        max_fills: usize,
        fleet: Option<Arc<crate::fleet::Fleet>>,
        metrics: Arc<Metrics>,
    ) -> Result<Cache, CacheError> {
        // The index lock comes first: a second process on this dir must fail
        // before the store clears temp files the first one is writing.
        std::fs::create_dir_all(dir)?;
        let index = Index::open(&dir.join(INDEX_FILE))?;
        let store = Store::open(dir)?;
        let blobs = store.scan(Kind::Blob)?;
        let manifests = store.scan(Kind::Manifest)?;
        for stray in blobs.strays.iter().chain(&manifests.strays) {
            tracing::warn!(path = %stray.display(), "ignoring a file in the store whose name is not its digest");
        }
        let manifest_digests: Vec<Digest> = manifests.found.into_iter().map(|(d, _)| d).collect();
        let reconciled = index.reconcile(&blobs.found, &manifest_digests, |d| {
            store
                .read_small(Kind::Manifest, d)
                .ok()
                .flatten()
                .map(|bytes| sniff_media_type(&bytes))
        })?;
        if reconciled.added + reconciled.dropped > 0 {
            tracing::info!(
                added = reconciled.added,
                dropped = reconciled.dropped,
                "index reconciled with the files on disk"
            );
        }
        let budget = Arc::new(Budget::new(limits, index.blobs()?));
        let cache = Cache {
            negative: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(config.negative_ttl)
                .build(),
            links: moka::sync::Cache::new(links::LINKS_IN_MEMORY),
            max_fills,
            fleet,
            config,
            budget,
            metrics,
            store,
            index,
            fills: Mutex::new(HashMap::new()),
            manifests: moka::sync::Cache::builder()
                .weigher(|_, m: &Arc<Manifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
                .max_capacity(MANIFEST_MEMORY)
                .build(),
            tags: RwLock::new(HashMap::new()),
            storage_trouble: Mutex::new(None),
            hits: Default::default(),
            misses: Default::default(),
            started_ms: crate::store::now_ms(),
            tag_locks: Mutex::new(HashMap::new()),
        };
        // The budget may have shrunk since the last run.
        cache.enforce_budget();
        Ok(cache)
    }

    /// Blob count and bytes on disk.
    pub fn usage(&self) -> (u64, u64) {
        self.budget.usage()
    }

    /// Evicts least recently used, unpinned blobs if usage is past the high
    /// watermark. Blocking: deletes files and writes the index.
    pub fn enforce_budget(&self) {
        let victims = self.budget.victims();
        if victims.is_empty() {
            return;
        }
        let mut removed = Vec::new();
        for (digest, size) in victims {
            // A reader may have pinned it since the victims were chosen.
            if self.budget.is_pinned(&digest) {
                continue;
            }
            match self.store.remove(Kind::Blob, &digest) {
                Ok(()) => {
                    self.budget.remove(&digest);
                    self.metrics.evictions.inc();
                    self.metrics.evicted_bytes.inc_by(size);
                    tracing::info!(%digest, bytes = size, "evicted blob (least recently used)");
                    removed.push(digest);
                }
                Err(e) => tracing::error!(%digest, error = %e, "could not evict blob"),
            }
        }
        if let Err(e) = self.index.remove_blobs(&removed) {
            // Reconciled at the next start: the files are the truth.
            tracing::error!(error = %e, "evicted blobs not removed from the index");
        }
        let (count, bytes) = self.budget.usage();
        tracing::info!(
            evicted = removed.len(),
            blobs = count,
            bytes,
            "cache usage after eviction"
        );
    }

    /// Remembers that the disk refused a write, and frees space if the
    /// budget allows, so the next misses stream past the store.
    fn note_storage_trouble(&self, e: &io::Error) {
        tracing::error!(error = %e, "cache storage refused a write; misses will stream straight from upstream for {}s", STORAGE_BACKOFF.as_secs());
        *self.storage_trouble.lock().expect("storage lock") =
            Some((std::time::Instant::now(), e.to_string()));
    }

    /// The reason misses must bypass the store, while that holds.
    fn storage_trouble(&self) -> Option<String> {
        let trouble = self.storage_trouble.lock().expect("storage lock");
        trouble
            .as_ref()
            .filter(|(at, _)| at.elapsed() < STORAGE_BACKOFF)
            .map(|(_, reason)| reason.clone())
    }

    /// Whether the data dir takes writes and the index answers.
    pub fn check_ready(&self) -> Result<(), String> {
        self.store.probe_writable().map_err(|e| {
            format!(
                "data dir {} is not writable: {e}",
                self.store.root().display()
            )
        })?;
        self.index
            .stat("hits")
            .map_err(|e| format!("index unreadable: {e}"))?;
        Ok(())
    }

    /// Counts a request answered from cache (`hit`) or from upstream.
    pub fn record(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes last-access times and counters gathered in memory to the index.
    pub fn flush(&self) {
        let touched = self.budget.take_dirty();
        if !touched.is_empty() {
            if let Err(e) = self.index.touch_blobs(&touched) {
                tracing::warn!(error = %e, blobs = touched.len(), "could not record last-access times");
            }
        }
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let counters = [
            ("hits", load(&self.hits)),
            ("misses", load(&self.misses)),
            ("started_ms", self.started_ms),
        ];
        if let Err(e) = self.index.put_stats(&counters) {
            tracing::warn!(error = %e, "could not record hit counters");
        }
    }

    /// Stops every fill in flight; their temp files are removed.
    pub fn abort_fills(&self) {
        for fill in self.fills.lock().expect("fills lock").values() {
            fill.abort();
        }
    }

    /// Resolves a manifest reference, from cache where policy allows.
    /// `accept` is the client's Accept header.
    pub async fn manifest(
        &self,
        upstream: &Upstream,
        repo: &str,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<(Arc<Manifest>, Freshness), CacheError> {
        if let Reference::Digest(digest) = reference {
            if let Some(m) = self.local_manifest(digest)? {
                self.authorize(upstream, repo, digest, Kind::Manifest)
                    .await?;
                return Ok((m, Freshness::Hit));
            }
        }
        let negative_key = format!("{}/{repo}@{reference}", upstream.name());
        if self.negative.contains_key(&negative_key) {
            return Err(CacheError::upstream(upstream, UpstreamError::NotFound));
        }
        let answer = match reference {
            Reference::Digest(digest) => {
                match upstream
                    .get_manifest(repo, &digest.to_string(), accept.unwrap_or(MANIFEST_TYPES))
                    .await
                {
                    Ok(fetched) => self
                        .keep_manifest(upstream, repo, fetched, Some(digest))
                        .map(|m| (m, Freshness::Fetched)),
                    Err(e) => Err(CacheError::upstream(upstream, e)),
                }
            }
            Reference::Tag(tag) => self.tagged_manifest(upstream, repo, tag, accept).await,
        };
        if let Err(CacheError::Upstream {
            error: UpstreamError::NotFound,
            ..
        }) = &answer
        {
            self.negative.insert(negative_key, ());
        }
        answer
    }

    async fn tagged_manifest(
        &self,
        upstream: &Upstream,
        repo: &str,
        tag: &str,
        accept: Option<&str>,
    ) -> Result<(Arc<Manifest>, Freshness), CacheError> {
        let key = format!("{}/{repo}:{tag}", upstream.name());
        if let Some(answer) = self.fresh_tag(&key, accept)? {
            return Ok((answer, Freshness::Hit));
        }
        let lock = self.tag_lock(&key);
        let _guard = lock.lock().await;
        // Someone holding the lock before us may have refreshed it.
        if let Some(answer) = self.fresh_tag(&key, accept)? {
            return Ok((answer, Freshness::Hit));
        }
        let answer = self.refresh_tag(upstream, repo, tag, &key, accept).await;
        drop(_guard);
        self.tag_locks.lock().expect("tag locks").remove(&key);
        answer
    }

    async fn refresh_tag(
        &self,
        upstream: &Upstream,
        repo: &str,
        tag: &str,
        key: &str,
        accept: Option<&str>,
    ) -> Result<(Arc<Manifest>, Freshness), CacheError> {
        let cached = self.tag_entry(key)?;
        let cached_manifest = match &cached {
            Some(entry) if accepts(accept, &entry.media_type) => self
                .local_manifest(&entry.digest)?
                .map(|m| (m, entry.confirmed)),
            _ => None,
        };
        let stale_or = |error: UpstreamError| -> Result<(Arc<Manifest>, Freshness), CacheError> {
            if let Some((manifest, confirmed)) = &cached_manifest {
                let age = confirmed.elapsed().unwrap_or(Duration::ZERO);
                if error.is_outage() && age <= self.config.stale_if_error {
                    let reason = format!(
                        "upstream {} failed ({error}); serving the tag as confirmed {}s ago",
                        upstream.name(),
                        age.as_secs()
                    );
                    return Ok((manifest.clone(), Freshness::Stale { reason }));
                }
            }
            Err(CacheError::upstream(upstream, error))
        };

        if let Some((manifest, _)) = &cached_manifest {
            match upstream
                .head_manifest(repo, tag, MANIFEST_TYPES, REVALIDATE_PATIENCE)
                .await
            {
                Ok(head) if head.digest.as_ref() == Some(&manifest.digest) => {
                    self.confirm_tag(key, manifest)?;
                    return Ok((manifest.clone(), Freshness::Revalidated));
                }
                // A new digest, or no digest header: fetch the manifest.
                Ok(_) => {}
                Err(e) => return stale_or(e),
            }
        }
        let fetched = match upstream.get_manifest(repo, tag, MANIFEST_TYPES).await {
            Ok(fetched) => fetched,
            Err(e) => return stale_or(e),
        };
        let manifest = self.keep_manifest(upstream, repo, fetched, None)?;
        self.confirm_tag(key, &manifest)?;
        if accepts(accept, &manifest.media_type) {
            return Ok((manifest, Freshness::Fetched));
        }
        // The client cannot take the tag's canonical form (an old client and
        // an index, say): ask upstream for the form it accepts, untagged.
        let fetched = upstream
            .get_manifest(repo, tag, accept.unwrap_or(MANIFEST_TYPES))
            .await
            .map_err(|e| CacheError::upstream(upstream, e))?;
        Ok((
            self.keep_manifest(upstream, repo, fetched, None)?,
            Freshness::Fetched,
        ))
    }

    /// The cached manifest for `key` if it is inside `tag_ttl` and acceptable.
    fn fresh_tag(
        &self,
        key: &str,
        accept: Option<&str>,
    ) -> Result<Option<Arc<Manifest>>, CacheError> {
        let Some(entry) = self.tag_entry(key)? else {
            return Ok(None);
        };
        let age = entry.confirmed.elapsed().unwrap_or(Duration::ZERO);
        if age >= self.config.tag_ttl || !accepts(accept, &entry.media_type) {
            return Ok(None);
        }
        self.local_manifest(&entry.digest)
    }

    fn tag_entry(&self, key: &str) -> Result<Option<TagEntry>, CacheError> {
        if let Some(entry) = self.tags.read().expect("tags lock").get(key) {
            return Ok(Some(entry.clone()));
        }
        let Some(record) = self.index.tag(key)? else {
            return Ok(None);
        };
        let Ok(digest) = record.digest.parse::<Digest>() else {
            tracing::warn!(key, "ignoring an index tag record with a malformed digest");
            return Ok(None);
        };
        let entry = TagEntry {
            digest,
            media_type: record.media_type,
            confirmed: UNIX_EPOCH + Duration::from_millis(record.confirmed_ms),
        };
        self.tags
            .write()
            .expect("tags lock")
            .insert(key.to_owned(), entry.clone());
        Ok(Some(entry))
    }

    fn confirm_tag(&self, key: &str, manifest: &Manifest) -> Result<(), CacheError> {
        let entry = TagEntry {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
            confirmed: SystemTime::now(),
        };
        self.index.put_tag(
            key,
            &TagRecord {
                digest: entry.digest.to_string(),
                media_type: entry.media_type.clone(),
                confirmed_ms: unix_ms(entry.confirmed),
            },
        )?;
        self.tags
            .write()
            .expect("tags lock")
            .insert(key.to_owned(), entry);
        Ok(())
    }

    fn tag_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.tag_locks
            .lock()
            .expect("tag locks")
            .entry(key.to_owned())
            .or_default()
            .clone()
    }

    fn local_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, CacheError> {
        if let Some(m) = self.manifests.get(digest) {
            return Ok(Some(m));
        }
        let Some(bytes) = self.store.read_small(Kind::Manifest, digest)? else {
            return Ok(None);
        };
        let media_type = match self.index.manifest_type(digest)? {
            Some(t) => t,
            None => sniff_media_type(&bytes),
        };
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            bytes: Bytes::from(bytes),
        });
        self.manifests.insert(digest.clone(), manifest.clone());
        Ok(Some(manifest))
    }

    /// Verifies a fetched manifest against the digest asked for (or the one
    /// upstream claimed), stores it, and links `repo` to what it references.
    fn keep_manifest(
        &self,
        upstream: &Upstream,
        repo: &str,
        fetched: FetchedManifest,
        expected: Option<&Digest>,
    ) -> Result<Arc<Manifest>, CacheError> {
        let digest = match expected.or(fetched.claimed_digest.as_ref()) {
            Some(expected) if !expected.matches(&fetched.bytes) => {
                let actual = Digest::sha256_of(&fetched.bytes);
                return Err(CacheError::DigestMismatch {
                    upstream: upstream.name().to_owned(),
                    expected: expected.clone(),
                    actual,
                });
            }
            Some(expected) => expected.clone(),
            None => Digest::sha256_of(&fetched.bytes),
        };
        if !self.store.contains(Kind::Manifest, &digest) {
            self.store
                .write_small(Kind::Manifest, &digest, &fetched.bytes)
                .map_err(|e| CacheError::from_commit(upstream, e))?;
        }
        self.index.put_manifest(&digest, &fetched.media_type)?;
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type: fetched.media_type,
            bytes: fetched.bytes,
        });
        self.manifests.insert(digest, manifest.clone());
        self.link_manifest(upstream, repo, &manifest);
        Ok(manifest)
    }
}

/// Whether a client's Accept header admits `media_type`. No header, a
/// wildcard, or a header naming no manifest type at all admits anything.
fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    let Some(accept) = accept else { return true };
    let mut names_a_manifest_type = false;
    for item in accept.split(',') {
        let item = item.split(';').next().unwrap_or("").trim();
        if item == media_type || item == "*/*" {
            return true;
        }
        names_a_manifest_type |= MANIFEST_TYPES.split(", ").any(|t| t == item);
    }
    !names_a_manifest_type
}

/// A manifest's media type from its own `mediaType` field, or its shape.
fn sniff_media_type(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(t),
            ..
        }) => t,
        Ok(Probe {
            manifests: Some(_), ..
        }) => "application/vnd.oci.image.index.v1+json".into(),
        _ => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matching() {
        let oci = "application/vnd.oci.image.manifest.v1+json";
        assert!(accepts(None, oci));
        assert!(accepts(Some("*/*"), oci));
        assert!(accepts(
            Some(&format!("application/json, {oci}; q=0.5")),
            oci
        ));
        assert!(!accepts(
            Some("application/vnd.docker.distribution.manifest.v2+json"),
            oci
        ));
        assert!(accepts(Some("application/json"), oci));
    }

    #[test]
    fn sniffs_media_types() {
        assert_eq!(
            sniff_media_type(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            ),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#),
            "application/vnd.oci.image.index.v1+json"
        );
        assert_eq!(
            sniff_media_type(b"{}"),
            "application/vnd.oci.image.manifest.v1+json"
        );
    }
}
