//! Offline administration of a data dir: `wharf cache ls|stats|purge|verify`.
//! It takes the index lock, so it refuses to run beside a `wharf serve` on
//! the same dir rather than race it. Never contacts an upstream.

use crate::cache::INDEX_FILE;
use crate::digest::{Digest, Verifier};
use crate::index::{Index, IndexError, TagRecord};
use crate::manifest::references;
use crate::store::{now_ms, Kind, Store};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0} is not a wharf data dir (no {INDEX_FILE})")]
    NotADataDir(String),
    #[error("{0}\nadmin commands need the data dir to themselves: stop `wharf serve` first")]
    Busy(IndexError),
    #[error(transparent)]
    Index(IndexError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<IndexError> for AdminError {
    fn from(e: IndexError) -> AdminError {
        match e {
            IndexError::InUse(_) => AdminError::Busy(e),
            other => AdminError::Index(other),
        }
    }
}

pub struct Admin {
    index: Index,
    store: Store,
}

/// What a purge removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Purged {
    pub tags: usize,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// What verify found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verified {
    pub good: usize,
    /// Files whose content does not match their name, moved to `quarantine/`.
    pub quarantined: Vec<PathBuf>,
}

impl Admin {
    pub fn open(dir: &Path) -> Result<Admin, AdminError> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.is_file() {
            return Err(AdminError::NotADataDir(dir.display().to_string()));
        }
        let index = Index::open(&index_path)?;
        let store = Store::open(dir)?;
        Ok(Admin { index, store })
    }

    /// One line per cached tag: name, digest, cached bytes, last confirmed
    /// by upstream, last read.
    pub fn ls(&self) -> Result<String, AdminError> {
        let blobs = self.blob_table()?;
        let mut out = format!(
            "{:<60} {:<19} {:>10} {:>12} {:>12}\n",
            "TAG", "DIGEST", "CACHED", "CONFIRMED", "LAST READ"
        );
        let mut tags = self.index.tags()?;
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        let now = now_ms();
        for (key, record) in tags {
            let (manifests, blob_set) = self.reachable(std::iter::once(&record));
            let cached: u64 = blob_set
                .iter()
                .filter_map(|d| blobs.get(d))
                .map(|(s, _)| s)
                .sum();
            let last_read = blob_set
                .iter()
                .filter_map(|d| blobs.get(d))
                .map(|(_, a)| *a)
                .max();
            let short = record.digest.get(..19).unwrap_or(&record.digest);
            let _ = writeln!(
                out,
                "{key:<60} {short:<19} {:>10} {:>12} {:>12}{}",
                human_bytes(cached),
                ago(now, record.confirmed_ms),
                last_read.map_or("-".into(), |a| ago(now, a)),
                if manifests.is_empty() {
                    "  (manifest not cached)"
                } else {
                    ""
                },
            );
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<String, AdminError> {
        let (count, bytes) = self.index.blob_totals()?;
        let tags = self.index.tags()?.len();
        let hits = self.index.stat("hits")?.unwrap_or(0);
        let misses = self.index.stat("misses")?.unwrap_or(0);
        let ratio = if hits + misses == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * hits as f64 / (hits + misses) as f64)
        };
        let since = self
            .index
            .stat("started_ms")?
            .map_or("never served".to_string(), |s| {
                format!("serve started {}", ago(now_ms(), s))
            });
        Ok(format!(
            "blobs:      {count}\nbytes:      {bytes} ({})\ntags:       {tags}\nhit ratio:  {ratio} ({hits} hits, {misses} misses; last serve run, {since})\n",
            human_bytes(bytes)
        ))
    }

    /// Removes the tags matching `[upstream/]repo[:tag]`, and the manifests
    /// and blobs only they reached.
    pub fn purge_repo(&self, pattern: &str) -> Result<Purged, AdminError> {
        let (repo, tag) = match pattern.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (pattern, None),
        };
        let matches = |key: &str| {
            let Some((key_repo, key_tag)) = key.rsplit_once(':') else {
                return false;
            };
            let repo_matches = key_repo == repo
                || key_repo.split_once('/').is_some_and(|(_, r)| r == repo)
                || key_repo.ends_with(&format!("/library/{repo}"));
            repo_matches && tag.is_none_or(|t| t == key_tag)
        };
        let (doomed, kept): (Vec<_>, Vec<_>) = self
            .index
            .tags()?
            .into_iter()
            .partition(|(k, _)| matches(k));
        self.remove_unreachable(doomed, kept, |_, _| true)
    }

    /// Removes blobs not read, and tags not confirmed, for `age`.
    pub fn purge_older_than(&self, age: Duration) -> Result<Purged, AdminError> {
        let cutoff = now_ms().saturating_sub(age.as_millis() as u64);
        let (doomed, kept): (Vec<_>, Vec<_>) = self
            .index
            .tags()?
            .into_iter()
            .partition(|(_, r)| r.confirmed_ms < cutoff);
        let blobs = self.blob_table()?;
        let mut purged = self.remove_unreachable(doomed, kept, |d, table| {
            table.get(d).is_some_and(|(_, access)| *access < cutoff)
        })?;
        // Old blobs no tag reaches at all (pulled by digest) go too.
        let old: Vec<(Digest, u64)> = blobs
            .iter()
            .filter(|(_, (_, access))| *access < cutoff)
            .map(|(d, (size, _))| (d.clone(), *size))
            .filter(|(d, _)| self.store.contains(Kind::Blob, d))
            .collect();
        let (count, bytes) = self.remove_blobs(&old)?;
        purged.blobs += count;
        purged.bytes += bytes;
        Ok(purged)
    }

    /// Re-hashes every blob and manifest; a file whose content does not
    /// match its name is moved to `quarantine/` and dropped from the index.
    pub fn verify(&self) -> Result<Verified, AdminError> {
        let mut report = Verified::default();
        let quarantine = self.store.root().join("quarantine");
        for kind in [Kind::Blob, Kind::Manifest] {
            let files = self.store.scan(kind)?.found;
            for (digest, _) in files {
                let path = self.store.path(kind, &digest);
                if hash_file(&path, &digest)? == digest {
                    report.good += 1;
                    continue;
                }
                std::fs::create_dir_all(&quarantine)?;
                let dest =
                    quarantine.join(format!("{}-{}", digest.algorithm().name(), digest.hex()));
                std::fs::rename(&path, &dest)?;
                match kind {
                    Kind::Blob => self.index.remove_blobs(std::slice::from_ref(&digest))?,
                    Kind::Manifest => self.index.remove_manifests(std::slice::from_ref(&digest))?,
                }
                report.quarantined.push(dest);
            }
        }
        Ok(report)
    }

    fn blob_table(&self) -> Result<HashMap<Digest, (u64, u64)>, AdminError> {
        Ok(self
            .index
            .blobs()?
            .into_iter()
            .map(|(d, size, access)| (d, (size, access)))
            .collect())
    }

    /// Manifests and blobs reachable from `tags`, through indexes.
    fn reachable<'a>(
        &self,
        tags: impl Iterator<Item = &'a TagRecord>,
    ) -> (HashSet<Digest>, HashSet<Digest>) {
        let mut manifests = HashSet::new();
        let mut blobs = HashSet::new();
        let mut queue: Vec<Digest> = tags.filter_map(|r| r.digest.parse().ok()).collect();
        while let Some(digest) = queue.pop() {
            let Ok(Some(bytes)) = self.store.read_small(Kind::Manifest, &digest) else {
                continue;
            };
            if !manifests.insert(digest) {
                continue;
            }
            let refs = references(&bytes);
            blobs.extend(refs.blobs.into_iter().map(|(d, _)| d));
            queue.extend(refs.manifests.into_iter().map(|(d, _)| d));
        }
        (manifests, blobs)
    }

    /// Drops the `doomed` tags, then every manifest and blob they reach
    /// that no `kept` tag reaches and that `also` approves.
    fn remove_unreachable(
        &self,
        doomed: Vec<(String, TagRecord)>,
        kept: Vec<(String, TagRecord)>,
        also: impl Fn(&Digest, &HashMap<Digest, (u64, u64)>) -> bool,
    ) -> Result<Purged, AdminError> {
        let blobs = self.blob_table()?;
        let (doomed_manifests, doomed_blobs) = self.reachable(doomed.iter().map(|(_, r)| r));
        let (kept_manifests, kept_blobs) = self.reachable(kept.iter().map(|(_, r)| r));
        let keys: Vec<String> = doomed.into_iter().map(|(k, _)| k).collect();
        self.index.remove_tags(&keys)?;
        let manifests: Vec<Digest> = doomed_manifests
            .difference(&kept_manifests)
            .cloned()
            .collect();
        for digest in &manifests {
            self.store.remove(Kind::Manifest, digest)?;
        }
        self.index.remove_manifests(&manifests)?;
        let blob_victims: Vec<(Digest, u64)> = doomed_blobs
            .difference(&kept_blobs)
            .filter(|d| also(d, &blobs))
            .filter_map(|d| blobs.get(d).map(|(size, _)| (d.clone(), *size)))
            .collect();
        let (count, bytes) = self.remove_blobs(&blob_victims)?;
        Ok(Purged {
            tags: keys.len(),
            manifests: manifests.len(),
            blobs: count,
            bytes,
        })
    }

    fn remove_blobs(&self, victims: &[(Digest, u64)]) -> Result<(usize, u64), AdminError> {
        for (digest, _) in victims {
            self.store.remove(Kind::Blob, digest)?;
        }
        let digests: Vec<Digest> = victims.iter().map(|(d, _)| d.clone()).collect();
        self.index.remove_blobs(&digests)?;
        Ok((victims.len(), victims.iter().map(|(_, s)| s).sum()))
    }
}

fn hash_file(path: &Path, digest: &Digest) -> io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut verifier = Verifier::new(digest.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(verifier.finish());
        }
        verifier.update(&buf[..n]);
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `now` and `then` in unix milliseconds.
fn ago(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::unix_ms;

    /// A data dir with two tags sharing a base layer.
    fn seeded() -> (tempfile::TempDir, Digest, Digest, Digest) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join(INDEX_FILE)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = |bytes: &[u8]| {
            let d = Digest::sha256_of(bytes);
            store.write_small(Kind::Blob, &d, bytes).unwrap();
            index.put_blob(&d, bytes.len() as u64).unwrap();
            d
        };
        let base = blob(b"base layer");
        let only_a = blob(b"a's layer");
        let only_b = blob(b"b's layer");
        for (name, own) in [("a", &only_a), ("b", &only_b)] {
            let m = format!(
                r#"{{"layers":[{{"digest":"{base}","size":10}},{{"digest":"{own}","size":9}}]}}"#
            );
            let d = Digest::sha256_of(m.as_bytes());
            store.write_small(Kind::Manifest, &d, m.as_bytes()).unwrap();
            index
                .put_manifest(&d, "application/vnd.oci.image.manifest.v1+json")
                .unwrap();
            let record = TagRecord {
                digest: d.to_string(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                confirmed_ms: unix_ms(std::time::SystemTime::now()),
            };
            index
                .put_tag(&format!("docker.io/library/{name}:1"), &record)
                .unwrap();
        }
        (dir, base, only_a, only_b)
    }

    #[test]
    fn purge_keeps_what_other_tags_share() {
        let (dir, base, only_a, only_b) = seeded();
        let admin = Admin::open(dir.path()).unwrap();
        let listing = admin.ls().unwrap();
        assert!(listing.contains("docker.io/library/a:1"), "{listing}");
        let purged = admin.purge_repo("a").unwrap();
        assert_eq!(
            purged,
            Purged {
                tags: 1,
                manifests: 1,
                blobs: 1,
                bytes: 9
            }
        );
        assert!(!admin.store.contains(Kind::Blob, &only_a));
        assert!(admin.store.contains(Kind::Blob, &base));
        assert!(admin.store.contains(Kind::Blob, &only_b));
        assert!(!admin.ls().unwrap().contains("library/a:1"));
        assert!(admin.stats().unwrap().contains("blobs:      2"));
    }

    #[test]
    fn purge_older_than_spares_recent_content() {
        let (dir, ..) = seeded();
        let admin = Admin::open(dir.path()).unwrap();
        assert_eq!(
            admin.purge_older_than(Duration::from_secs(3600)).unwrap(),
            Purged::default()
        );
        std::thread::sleep(Duration::from_millis(5));
        let all = admin.purge_older_than(Duration::ZERO).unwrap();
        assert_eq!((all.tags, all.manifests, all.blobs), (2, 2, 3));
        assert!(admin.stats().unwrap().contains("blobs:      0"));
    }

    #[test]
    fn verify_quarantines_corrupt_files() {
        let (dir, base, ..) = seeded();
        std::fs::write(
            Store::open(dir.path()).unwrap().path(Kind::Blob, &base),
            b"bit rot",
        )
        .unwrap();
        let admin = Admin::open(dir.path()).unwrap();
        let report = admin.verify().unwrap();
        assert_eq!(report.quarantined.len(), 1);
        assert_eq!(report.good, 4);
        assert!(!admin.store.contains(Kind::Blob, &base));
        assert!(admin.stats().unwrap().contains("blobs:      2"));
    }

    #[test]
    fn refuses_while_the_index_is_held() {
        let (dir, ..) = seeded();
        let _serving = Index::open(&dir.path().join(INDEX_FILE)).unwrap();
        let err = Admin::open(dir.path()).err().expect("must refuse");
        assert!(
            err.to_string().contains("stop `wharf serve` first"),
            "{err}"
        );
    }
}
