//! Content-addressed files under the data dir. Blobs and manifests live at
//! `<kind>/<algo>/<2 hex>/<hex>`, built only from a validated [`Digest`].
//! New content is written to `tmp/`, hashed while written, fsynced and
//! renamed into place only when the digest matches. Owns file layout and
//! durability; knows nothing of HTTP, upstreams or policy.

mod budget;
mod reader;
mod temp;

pub use budget::{now_ms, Budget, Limits, Pin};
pub use reader::{stream_range, Progress};
pub use temp::{CommitError, TempBlob};

use crate::digest::Digest;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Blob => "blobs",
            Kind::Manifest => "manifests",
        }
    }
}

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    temp_counter: AtomicU64,
}

impl Store {
    /// Creates the layout if needed and removes temp files a previous run
    /// left behind: they were never verified, so nothing may use them.
    pub fn open(root: &Path) -> io::Result<Store> {
        for dir in ["blobs", "manifests", "tmp"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let store = Store {
            root: root.to_owned(),
            temp_counter: AtomicU64::new(0),
        };
        let mut removed = 0;
        for entry in fs::read_dir(store.tmp_dir())? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed unfinished temp files from an earlier run");
        }
        Ok(store)
    }

    /// Writes, syncs and removes a small file in `tmp/`.
    pub fn probe_writable(&self) -> io::Result<()> {
        let path = self
            .tmp_dir()
            .join(format!("ready-probe.{}", std::process::id()));
        let result = File::create(&path).and_then(|mut f| {
            f.write_all(b"ok")?;
            f.sync_all()
        });
        let _ = fs::remove_file(&path);
        result
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn path(&self, kind: Kind, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join(kind.dir())
            .join(digest.algorithm().name())
            .join(&hex[..2])
            .join(hex)
    }

    /// A new temp file for `digest`, unique even when several fills of the
    /// same digest overlap across processes.
    pub fn create_temp(&self, digest: &Digest) -> io::Result<TempBlob> {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}.{}.{n}.part", digest.hex(), std::process::id());
        TempBlob::create(self.tmp_dir().join(name), digest.clone())
    }

    /// Opens a committed file, with its length.
    pub fn open_file(&self, kind: Kind, digest: &Digest) -> io::Result<Option<(Arc<File>, u64)>> {
        match File::open(self.path(kind, digest)) {
            Ok(file) => {
                let len = file.metadata()?.len();
                Ok(Some((Arc::new(file), len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn contains(&self, kind: Kind, digest: &Digest) -> bool {
        self.path(kind, digest).is_file()
    }

    /// Writes small content (a manifest) durably; the caller has verified it.
    pub fn write_small(
        &self,
        kind: Kind,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<(), CommitError> {
        let mut temp = self.create_temp(digest)?;
        temp.append(bytes)?;
        temp.commit(&self.path(kind, digest)).map(|_| ())
    }

    pub fn read_small(&self, kind: Kind, digest: &Digest) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(kind, digest)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn remove(&self, kind: Kind, digest: &Digest) -> io::Result<()> {
        match fs::remove_file(self.path(kind, digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every committed file of `kind`, with its size. Files whose names are
    /// not digests are listed as strays rather than trusted.
    pub fn scan(&self, kind: Kind) -> io::Result<Scan> {
        let mut found = Vec::new();
        let mut strays = Vec::new();
        let base = self.root.join(kind.dir());
        for algo in fs::read_dir(&base)? {
            let algo = algo?;
            let algo_name = algo.file_name().to_string_lossy().into_owned();
            if !algo.file_type()?.is_dir() {
                strays.push(algo.path());
                continue;
            }
            for prefix in fs::read_dir(algo.path())? {
                let prefix = prefix?;
                if !prefix.file_type()?.is_dir() {
                    strays.push(prefix.path());
                    continue;
                }
                for file in fs::read_dir(prefix.path())? {
                    let file = file?;
                    let name = file.file_name().to_string_lossy().into_owned();
                    let parsed = format!("{algo_name}:{name}").parse::<Digest>();
                    match parsed {
                        Ok(d)
                            if file.file_type()?.is_file()
                                && prefix.file_name() == d.hex()[..2] =>
                        {
                            found.push((d, file.metadata()?.len()))
                        }
                        _ => strays.push(file.path()),
                    }
                }
            }
        }
        Ok(Scan { found, strays })
    }
}

/// What [`Store::scan`] saw.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<(Digest, u64)>,
    pub strays: Vec<PathBuf>,
}

/// fsyncs a directory so a rename into it survives a power cut.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_built_from_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        let p = store.path(Kind::Blob, &d);
        assert_eq!(
            p.strip_prefix(dir.path()).unwrap(),
            Path::new("blobs/sha256").join(&d.hex()[..2]).join(d.hex())
        );
    }

    #[test]
    fn open_clears_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t = store.create_temp(&Digest::sha256_of(b"x")).unwrap();
        t.append(b"partial").unwrap();
        std::mem::forget(t); // as if the process died mid-fill
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        drop(Store::open(dir.path()).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn small_writes_round_trip_and_scan_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"{}");
        store.write_small(Kind::Manifest, &d, b"{}").unwrap();
        assert_eq!(
            store.read_small(Kind::Manifest, &d).unwrap().unwrap(),
            b"{}"
        );
        fs::write(dir.path().join("manifests/sha256/zz"), b"junk").unwrap();
        let scan = store.scan(Kind::Manifest).unwrap();
        assert_eq!(scan.found, vec![(d.clone(), 2)]);
        assert_eq!(scan.strays.len(), 1);
        assert!(store.write_small(Kind::Manifest, &d, b"not it").is_err());
    }
}
