//! A blob being written: hashed as it is appended, committed by fsync and
//! rename only when its digest matches, removed if dropped uncommitted.

use super::sync_dir;
use crate::digest::{Digest, Verifier};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("digest mismatch: expected {expected}, upstream sent content hashing to {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub struct TempBlob {
    path: PathBuf,
    file: File,
    expected: Digest,
    verifier: Option<Verifier>,
    written: u64,
    committed: bool,
}

impl TempBlob {
    pub(super) fn create(path: PathBuf, expected: Digest) -> io::Result<TempBlob> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(TempBlob {
            path,
            file,
            verifier: Some(Verifier::new(expected.algorithm())),
            expected,
            written: 0,
            committed: false,
        })
    }

    /// A read-only descriptor on the same file. It stays valid after the
    /// rename, so readers that opened it mid-fill keep reading.
    pub fn reader(&self) -> io::Result<Arc<File>> {
        File::open(&self.path).map(Arc::new)
    }

    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.verifier
            .as_mut()
            .expect("verifier present until commit")
            .update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the content against the expected digest; call once, after
    /// the last append. Dropping the blob afterwards removes the file
    /// (a blob served but not kept); readers keep their descriptors.
    pub fn verify(&mut self) -> Result<u64, CommitError> {
        let actual = self
            .verifier
            .take()
            .expect("verify is called once")
            .finish();
        if actual == self.expected {
            Ok(self.written)
        } else {
            Err(CommitError::Mismatch {
                expected: self.expected.clone(),
                actual,
            })
        }
    }

    /// Verifies, then makes the blob durable at `dest`. On a mismatch the
    /// temp file is removed (by drop) and nothing appears at `dest`.
    pub fn commit(mut self, dest: &Path) -> Result<u64, CommitError> {
        let len = self.verify()?;
        self.persist(dest)?;
        Ok(len)
    }

    /// fsyncs and renames a verified blob to `dest`.
    pub fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        assert!(self.verifier.is_none(), "persist only after verify");
        self.file.sync_all()?;
        let parent = dest.parent().expect("store paths have a parent");
        fs::create_dir_all(parent)?;
        fs::rename(&self.path, dest)?;
        self.committed = true;
        sync_dir(parent)
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove temp file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Store;
    use super::*;

    #[test]
    fn mismatch_commits_nothing_and_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"good");
        let mut t = store.create_temp(&d).unwrap();
        t.append(b"evil").unwrap();
        let dest = store.path(super::super::Kind::Blob, &d);
        assert!(matches!(t.commit(&dest), Err(CommitError::Mismatch { .. })));
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn reader_survives_the_rename() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"content");
        let mut t = store.create_temp(&d).unwrap();
        let reader = t.reader().unwrap();
        t.append(b"content").unwrap();
        t.commit(&store.path(super::super::Kind::Blob, &d)).unwrap();
        let mut buf = [0u8; 7];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"content");
    }
}
