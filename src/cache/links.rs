//! Which repositories are known to reference which digests, so content
//! cached through one repository (perhaps fetched with wharf's own
//! credentials for a private one) is served to another repository only if
//! that one has it too. A link `upstream/repo@digest` is learned when
//! upstream serves the digest for the repository, from the references of
//! a manifest fetched for it, or from an upstream HEAD that succeeds.
//! Links live in memory and in the index; a digest with no link for the
//! asking repository costs one upstream HEAD, whose answer is kept.

use super::{Cache, CacheError, Manifest};
use crate::digest::Digest;
use crate::store::Kind;
use crate::upstream::{Upstream, UpstreamError, MANIFEST_TYPES};

/// Links remembered in memory; the rest are one index read away.
pub(super) const LINKS_IN_MEMORY: u64 = 200_000;

pub(super) fn link_key(upstream: &str, repo: &str, digest: &Digest) -> String {
    format!("{upstream}/{repo}@{digest}")
}

impl Cache {
    pub(super) fn is_linked(&self, key: &str) -> Result<bool, CacheError> {
        if self.links.contains_key(key) {
            return Ok(true);
        }
        let known = self.index.has_link(key)?;
        if known {
            self.links.insert(key.to_owned(), ());
        }
        Ok(known)
    }

    pub(super) fn add_links(&self, keys: Vec<String>) {
        let new: Vec<String> = keys
            .into_iter()
            .filter(|k| !self.links.contains_key(k))
            .collect();
        if new.is_empty() {
            return;
        }
        if let Err(e) = self.index.put_links(&new) {
            // Only costs an upstream HEAD later; the link is kept in memory.
            tracing::warn!(error = %e, links = new.len(), "could not record repository links");
        }
        for key in new {
            self.links.insert(key, ());
        }
    }

    /// Links `repo` to a manifest fetched for it, to everything the manifest
    /// references, and to what its cached child manifests reference (an
    /// index's platform manifests may have been cached through another
    /// repository).
    pub(super) fn link_manifest(&self, upstream: &Upstream, repo: &str, manifest: &Manifest) {
        let key = |d: &Digest| link_key(upstream.name(), repo, d);
        let refs = crate::manifest::references(&manifest.bytes);
        let mut keys = vec![key(&manifest.digest)];
        keys.extend(refs.blobs.iter().map(|(d, _)| key(d)));
        for (child, _) in &refs.manifests {
            keys.push(key(child));
            if let Ok(Some(bytes)) = self.store.read_small(Kind::Manifest, child) {
                let grandchildren = crate::manifest::references(&bytes);
                keys.extend(grandchildren.blobs.iter().map(|(d, _)| key(d)));
            }
        }
        self.add_links(keys);
    }

    /// Lets `repo` have cached content `digest` if upstream confirms, with a
    /// HEAD, that the repository has it. Fails closed: an upstream that
    /// cannot answer means the cached copy is not served to this repository.
    pub(super) async fn authorize(
        &self,
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
        kind: Kind,
    ) -> Result<(), CacheError> {
        let key = link_key(upstream.name(), repo, digest);
        if self.is_linked(&key)? {
            return Ok(());
        }
        if self.negative.contains_key(&key) {
            return Err(CacheError::upstream(upstream, UpstreamError::NotFound));
        }
        let confirmed = match kind {
            Kind::Blob => upstream.head_blob(repo, digest).await.map(|_| ()),
            Kind::Manifest => upstream
                .head_manifest(
                    repo,
                    &digest.to_string(),
                    MANIFEST_TYPES,
                    upstream.config.response_timeout,
                )
                .await
                .map(|_| ()),
        };
        match confirmed {
            Ok(()) => {
                tracing::debug!(upstream = upstream.name(), repo, %digest, "upstream confirmed the repository has the digest");
                self.add_links(vec![key]);
                Ok(())
            }
            Err(e) => {
                if e == UpstreamError::NotFound {
                    self.negative.insert(key, ());
                }
                tracing::warn!(upstream = upstream.name(), repo, %digest, error = %e, "not serving cached content to a repository that upstream does not confirm has it");
                Err(CacheError::upstream(upstream, e))
            }
        }
    }
}
