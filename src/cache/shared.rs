//! Where a fill gets its bytes when replicas share a bucket ([`crate::fleet`]):
//! from the bucket if another replica already put the blob there, else
//! from upstream, optionally after taking the fleet's fetch lease (or
//! waiting for the replica that holds it). A blob fetched from upstream is
//! uploaded once it is verified and committed locally. Content from the
//! bucket is served to a repository only once it is known to reference it,
//! as for the local disk.

use super::{Cache, CacheError};
use crate::digest::Digest;
use crate::fleet::{Fleet, HeldLease, Lease};
use crate::store::Kind;
use crate::upstream::{error_chain, Upstream, UpstreamError};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often a replica waiting on another's lease looks for the blob.
const LEASE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Upstream,
    Bucket,
}

impl Origin {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Bucket => "bucket",
        }
    }
}

/// An open byte stream for a fill.
pub(super) struct Source {
    pub total: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, CacheError>>,
    pub origin: Origin,
    /// The fleet's fetch lease, held until the blob is in the bucket.
    pub lease: Option<HeldLease>,
}

impl Cache {
    /// Opens the blob's bytes: from the fleet's bucket when it has them,
    /// otherwise from upstream.
    pub(super) async fn open_source(
        &self,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
    ) -> Result<Source, CacheError> {
        let mut lease = None;
        if let Some(fleet) = &self.fleet {
            if let Some(source) = self.bucket_source(fleet, upstream, repo, digest).await? {
                return Ok(source);
            }
            // Wait while another replica holds the lease (it renews it while
            // its fetch runs); take it over once it lapses.
            while fleet.leases() {
                match fleet.lease(digest).await {
                    Ok(Lease::Held(held)) => {
                        lease = Some(held);
                        break;
                    }
                    Ok(Lease::Elsewhere { until }) => {
                        if let Some(source) = self
                            .wait_for_bucket(fleet, upstream, repo, digest, until)
                            .await?
                        {
                            return Ok(source);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "fetch lease unavailable; fetching from upstream");
                        break;
                    }
                }
            }
        }
        let resp = match upstream.get_blob(repo, digest, None).await {
            Ok(resp) => resp,
            Err(e) => {
                if let (Some(fleet), Some(held)) = (&self.fleet, lease) {
                    fleet.release(held).await;
                }
                return Err(CacheError::upstream(upstream, e));
            }
        };
        self.add_links(vec![super::links::link_key(upstream.name(), repo, digest)]);
        let total = resp.content_length();
        let name = upstream.name().to_owned();
        let body = resp
            .bytes_stream()
            .map_err(move |e| CacheError::Upstream {
                upstream: name.clone(),
                error: UpstreamError::Body(error_chain(e)),
            })
            .boxed();
        Ok(Source {
            total,
            body,
            origin: Origin::Upstream,
            lease,
        })
    }

    /// The blob from the bucket, if it is there and `repo` may have it.
    async fn bucket_source(
        &self,
        fleet: &Fleet,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<Source>, CacheError> {
        match fleet.size(digest).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "shared bucket unavailable; fetching from upstream");
                return Ok(None);
            }
        }
        self.authorize(upstream, repo, digest, Kind::Blob).await?;
        match fleet.read(digest).await {
            Ok((len, stream)) => Ok(Some(Source {
                total: Some(len),
                body: stream
                    .map_err(|e| CacheError::Bucket(e.to_string()))
                    .boxed(),
                origin: Origin::Bucket,
                lease: None,
            })),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "shared bucket read failed; fetching from upstream");
                Ok(None)
            }
        }
    }

    /// Waits for the replica holding the lease to put the blob in the
    /// bucket, at most until its lease runs out.
    async fn wait_for_bucket(
        &self,
        fleet: &Fleet,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
        until: SystemTime,
    ) -> Result<Option<Source>, CacheError> {
        while SystemTime::now() < until {
            tokio::time::sleep(LEASE_POLL).await;
            if let Some(source) = self.bucket_source(fleet, upstream, repo, digest).await? {
                return Ok(Some(source));
            }
        }
        Ok(None)
    }

    /// The blob's length when only the fleet's bucket has it (not on disk
    /// here, not filling) and `repo` may have it: a byte range of it is
    /// then read straight from the bucket, with no local copy.
    pub async fn bucket_len(
        &self,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, CacheError> {
        let Some(fleet) = &self.fleet else {
            return Ok(None);
        };
        let here = self.store.contains(Kind::Blob, digest)
            || self.fills.lock().expect("fills lock").contains_key(digest);
        if here {
            return Ok(None);
        }
        let Ok(Some(len)) = fleet.size(digest).await else {
            return Ok(None);
        };
        self.authorize(upstream, repo, digest, Kind::Blob).await?;
        Ok(Some(len))
    }

    /// Bytes `start..end` of a blob, straight from the fleet's bucket.
    pub async fn bucket_range(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, CacheError> {
        let fleet = self
            .fleet
            .as_ref()
            .ok_or_else(|| CacheError::Bucket("no bucket configured".into()))?;
        let stream = fleet
            .read_range(digest, start, end)
            .await
            .map_err(|e| CacheError::Bucket(e.to_string()))?;
        Ok(stream.map_err(std::io::Error::other).boxed())
    }

    /// Uploads a blob fetched from upstream and committed here, then lets
    /// go of the lease. Runs after the fill, so clients never wait for it.
    pub(super) fn share(self: &Arc<Self>, digest: Digest, lease: Option<HeldLease>) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        let cache = self.clone();
        tokio::spawn(async move {
            // Pinned, so eviction cannot take the file mid-upload.
            let _pin = cache.budget.pin(&digest);
            let started = std::time::Instant::now();
            let uploaded = match cache.store.open_file(Kind::Blob, &digest) {
                Ok(Some((file, _))) => match file.try_clone() {
                    Ok(file) => fleet.upload(&digest, file).await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Ok(None) => Err("evicted before upload".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let result = match &uploaded {
                Ok(()) => {
                    tracing::info!(%digest, ms = started.elapsed().as_millis() as u64, "blob uploaded to the shared bucket");
                    "ok"
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "blob not uploaded to the shared bucket; other replicas will fetch it themselves");
                    "error"
                }
            };
            cache.metrics.bucket_upload(result);
            if let Some(held) = lease {
                fleet.release(held).await;
            }
        });
    }

    /// Gives a lease back after a fill that will not be shared.
    pub(super) fn release_lease(&self, lease: Option<HeldLease>) {
        if let (Some(fleet), Some(held)) = (self.fleet.clone(), lease) {
            tokio::spawn(async move { fleet.release(held).await });
        }
    }
}
