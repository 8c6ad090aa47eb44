//! The persistent index (redb): which blobs and manifests are stored, their
//! sizes and media types, and what each cached tag points to. The files in
//! the store are the truth; this index is rebuilt from them at start, so
//! deleting it loses only tags. Never reads or writes blob content.

use crate::digest::Digest;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// digest → (size in bytes, last access in unix milliseconds)
const BLOBS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blobs");
/// digest → media type
const MANIFESTS: TableDefinition<&str, &str> = TableDefinition::new("manifests");
/// `upstream/repo:tag` → JSON [`TagRecord`]
const TAGS: TableDefinition<&str, &[u8]> = TableDefinition::new("tags");
/// `upstream/repo@digest` → unix milliseconds when wharf learned that the
/// repository references the digest (see `cache::links`).
const LINKS: TableDefinition<&str, u64> = TableDefinition::new("links");
/// counter name → value: the last serving process's hit/miss counts.
const STATS: TableDefinition<&str, u64> = TableDefinition::new("stats");

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("the index {0} is in use by another wharf process (stop it, or use another data dir)")]
    InUse(String),
    // Boxed: redb's error is large and every Result in the crate carries this.
    #[error("index: {0}")]
    Db(Box<redb::Error>),
    #[error("index record {key:?} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

fn db_err<E: Into<redb::Error>>(e: E) -> IndexError {
    IndexError::Db(Box::new(e.into()))
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> IndexError {
                db_err(e)
            }
        }
    )*};
}
from_redb!(redb::TableError, redb::StorageError);

/// What a tag pointed to when upstream last confirmed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    /// Unix milliseconds of the last upstream confirmation.
    pub confirmed_ms: u64,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub struct Index {
    db: Database,
}

/// What [`Index::reconcile`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub added: usize,
    pub dropped: usize,
}

impl Index {
    /// Opens or creates the index. A file that redb cannot read is moved
    /// aside and a fresh index is built: the store's files are the truth.
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(IndexError::InUse(path.display().to_string()))
            }
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                return Err(IndexError::InUse(path.display().to_string()))
            }
            Err(e) => {
                let aside = path.with_extension("broken");
                tracing::error!(error = %e, moved_to = %aside.display(), "index unreadable; rebuilding it from the store");
                std::fs::rename(path, &aside).map_err(|e| db_err(redb::StorageError::Io(e)))?;
                Database::create(path).map_err(db_err)?
            }
        };
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(BLOBS).map_err(db_err)?;
        tx.open_table(MANIFESTS).map_err(db_err)?;
        tx.open_table(TAGS).map_err(db_err)?;
        tx.open_table(STATS).map_err(db_err)?;
        tx.open_table(LINKS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Index { db })
    }

    pub fn put_blob(&self, digest: &Digest, size: u64) -> Result<(), IndexError> {
        let now = unix_ms(SystemTime::now());
        self.write(|tx| {
            tx.open_table(BLOBS)?
                .insert(digest.to_string().as_str(), (size, now))?;
            Ok(())
        })
    }

    pub fn remove_blobs(&self, digests: &[Digest]) -> Result<(), IndexError> {
        self.write(|tx| {
            let mut table = tx.open_table(BLOBS)?;
            for digest in digests {
                table.remove(digest.to_string().as_str())?;
            }
            Ok(())
        })
    }

    /// Records last-access times gathered in memory, in one transaction.
    pub fn touch_blobs(&self, touched: &[(Digest, u64)]) -> Result<(), IndexError> {
        self.write(|tx| {
            let mut table = tx.open_table(BLOBS)?;
            for (digest, access) in touched {
                let key = digest.to_string();
                let size = table.get(key.as_str())?.map(|v| v.value().0);
                if let Some(size) = size {
                    table.insert(key.as_str(), (size, *access))?;
                }
            }
            Ok(())
        })
    }

    /// Every indexed blob: digest, size, last access (unix milliseconds).
    pub fn blobs(&self) -> Result<Vec<(Digest, u64, u64)>, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(BLOBS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if let Ok(digest) = k.value().parse() {
                let (size, access) = v.value();
                out.push((digest, size, access));
            }
        }
        Ok(out)
    }

    pub fn put_manifest(&self, digest: &Digest, media_type: &str) -> Result<(), IndexError> {
        self.write(|tx| {
            tx.open_table(MANIFESTS)?
                .insert(digest.to_string().as_str(), media_type)?;
            Ok(())
        })
    }

    pub fn manifest_type(&self, digest: &Digest) -> Result<Option<String>, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(MANIFESTS).map_err(db_err)?;
        let value = table.get(digest.to_string().as_str()).map_err(db_err)?;
        Ok(value.map(|v| v.value().to_owned()))
    }

    /// Records links (`upstream/repo@digest` keys), in one transaction.
    pub fn put_links(&self, keys: &[String]) -> Result<(), IndexError> {
        let now = unix_ms(SystemTime::now());
        self.write(|tx| {
            let mut table = tx.open_table(LINKS)?;
            for key in keys {
                table.insert(key.as_str(), now)?;
            }
            Ok(())
        })
    }

    pub fn has_link(&self, key: &str) -> Result<bool, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(LINKS).map_err(db_err)?;
        Ok(table.get(key).map_err(db_err)?.is_some())
    }

    pub fn put_tag(&self, key: &str, record: &TagRecord) -> Result<(), IndexError> {
        let json = serde_json::to_vec(record).expect("tag record serializes");
        self.write(|tx| {
            tx.open_table(TAGS)?.insert(key, json.as_slice())?;
            Ok(())
        })
    }

    pub fn tag(&self, key: &str) -> Result<Option<TagRecord>, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TAGS).map_err(db_err)?;
        let Some(value) = table.get(key).map_err(db_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| IndexError::Corrupt {
                key: key.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Every tag record, by key.
    pub fn tags(&self) -> Result<Vec<(String, TagRecord)>, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(TAGS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            match serde_json::from_slice(v.value()) {
                Ok(record) => out.push((k.value().to_owned(), record)),
                Err(e) => {
                    tracing::warn!(key = k.value(), error = %e, "skipping an unreadable tag record")
                }
            }
        }
        Ok(out)
    }

    pub fn remove_tags(&self, keys: &[String]) -> Result<(), IndexError> {
        self.write(|tx| {
            let mut table = tx.open_table(TAGS)?;
            for key in keys {
                table.remove(key.as_str())?;
            }
            Ok(())
        })
    }

    pub fn remove_manifests(&self, digests: &[Digest]) -> Result<(), IndexError> {
        self.write(|tx| {
            let mut table = tx.open_table(MANIFESTS)?;
            for digest in digests {
                table.remove(digest.to_string().as_str())?;
            }
            Ok(())
        })
    }

    pub fn put_stats(&self, counters: &[(&str, u64)]) -> Result<(), IndexError> {
        self.write(|tx| {
            let mut table = tx.open_table(STATS)?;
            for (name, value) in counters {
                table.insert(*name, *value)?;
            }
            Ok(())
        })
    }

    pub fn stat(&self, name: &str) -> Result<Option<u64>, IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(STATS).map_err(db_err)?;
        Ok(table.get(name).map_err(db_err)?.map(|v| v.value()))
    }

    /// Blob count and total bytes.
    pub fn blob_totals(&self) -> Result<(u64, u64), IndexError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let table = tx.open_table(BLOBS).map_err(db_err)?;
        let mut bytes = 0;
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            bytes += v.value().0;
        }
        Ok((table.len().map_err(db_err)?, bytes))
    }

    /// Makes the index agree with the files: entries without a file are
    /// dropped, files without an entry are added. `sniff` names the media
    /// type of a manifest the index had lost.
    pub fn reconcile(
        &self,
        blobs_on_disk: &[(Digest, u64)],
        manifests_on_disk: &[Digest],
        sniff: impl Fn(&Digest) -> Option<String>,
    ) -> Result<Reconciled, IndexError> {
        let mut result = Reconciled::default();
        let now = unix_ms(SystemTime::now());
        self.write(|tx| {
            let mut blobs = tx.open_table(BLOBS)?;
            let on_disk: std::collections::HashMap<String, u64> = blobs_on_disk
                .iter()
                .map(|(d, size)| (d.to_string(), *size))
                .collect();
            let mut stale = Vec::new();
            for entry in blobs.iter()? {
                let (k, v) = entry?;
                if on_disk.get(k.value()) != Some(&v.value().0) {
                    stale.push(k.value().to_owned());
                }
            }
            for key in &stale {
                blobs.remove(key.as_str())?;
            }
            result.dropped += stale.len();
            for (key, size) in &on_disk {
                if blobs.get(key.as_str())?.is_none() {
                    blobs.insert(key.as_str(), (*size, now))?;
                    result.added += 1;
                }
            }

            let mut manifests = tx.open_table(MANIFESTS)?;
            let on_disk: std::collections::HashSet<String> =
                manifests_on_disk.iter().map(Digest::to_string).collect();
            let mut stale = Vec::new();
            for entry in manifests.iter()? {
                let (k, _) = entry?;
                if !on_disk.contains(k.value()) {
                    stale.push(k.value().to_owned());
                }
            }
            for key in &stale {
                manifests.remove(key.as_str())?;
            }
            result.dropped += stale.len();
            for digest in manifests_on_disk {
                let key = digest.to_string();
                if manifests.get(key.as_str())?.is_none() {
                    if let Some(media_type) = sniff(digest) {
                        manifests.insert(key.as_str(), media_type.as_str())?;
                        result.added += 1;
                    }
                }
            }
            Ok(())
        })?;
        Ok(result)
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), IndexError>,
    ) -> Result<(), IndexError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        f(&tx)?;
        tx.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let d = Digest::sha256_of(b"m");
        let tag = TagRecord {
            digest: d.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            confirmed_ms: 42,
        };
        {
            let index = Index::open(&path).unwrap();
            index.put_manifest(&d, &tag.media_type).unwrap();
            index.put_tag("docker.io/library/a:1", &tag).unwrap();
            index.put_blob(&d, 7).unwrap();
            assert!(matches!(Index::open(&path), Err(IndexError::InUse(_))));
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(
            index.tag("docker.io/library/a:1").unwrap(),
            Some(tag.clone())
        );
        assert_eq!(
            index.manifest_type(&d).unwrap().as_deref(),
            Some(tag.media_type.as_str())
        );
        assert_eq!(index.blob_totals().unwrap(), (1, 7));
        index.touch_blobs(&[(d.clone(), 99)]).unwrap();
        assert_eq!(index.blobs().unwrap(), vec![(d.clone(), 7, 99)]);
        index.remove_blobs(&[d]).unwrap();
        assert_eq!(index.blob_totals().unwrap(), (0, 0));
    }

    #[test]
    fn reconcile_makes_the_files_the_truth() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i")).unwrap();
        let gone = Digest::sha256_of(b"gone");
        let kept = Digest::sha256_of(b"kept");
        let found = Digest::sha256_of(b"found");
        index.put_blob(&gone, 4).unwrap();
        index.put_blob(&kept, 4).unwrap();
        index.put_manifest(&gone, "t").unwrap();
        let r = index
            .reconcile(
                &[(kept.clone(), 4), (found.clone(), 5)],
                std::slice::from_ref(&found),
                |_| Some("x".into()),
            )
            .unwrap();
        assert_eq!(
            r,
            Reconciled {
                added: 2,
                dropped: 2
            }
        );
        assert_eq!(index.blob_totals().unwrap(), (2, 9));
        assert_eq!(index.manifest_type(&found).unwrap().as_deref(), Some("x"));
        assert_eq!(index.manifest_type(&gone).unwrap(), None);
    }

    #[test]
    fn unreadable_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        std::fs::write(&path, b"this is not a redb file at all, not even close").unwrap();
        let index = Index::open(&path).unwrap();
        assert_eq!(index.blob_totals().unwrap(), (0, 0));
        assert!(path.with_extension("broken").exists());
    }
}
