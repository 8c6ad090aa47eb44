//! Starting wharf in-process against a fake upstream, and looking at its data dir.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::fake_upstream::{FakeUpstream, Image, Options};
use crate::common::http::{self, Outcome};

/// `[[upstream]]` table text.
pub fn upstream_toml(name: &str, url: &str, default: bool, extra: &str) -> String {
    format!("[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\ndefault = {default}\n{extra}\n")
}

pub fn config_text(dir: &Path, cache: &str, upstreams: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[storage]\ndir = \"{}\"\n[cache]\n{cache}\n{upstreams}",
        dir.display()
    )
}

/// Start wharf on 127.0.0.1:0 with this config; panics with the config text on error.
pub async fn start_wharf(dir: &Path, cache: &str, upstreams: &str) -> wharf::RunningServer {
    let text = config_text(dir, cache, upstreams);
    let cfg = wharf::config::Config::from_toml_str(&text)
        .unwrap_or_else(|e| panic!("config rejected: {e:?}\n{text}"));
    match tokio::time::timeout(Duration::from_secs(10), wharf::start(cfg)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("wharf::start failed: {e:?}\n{text}"),
        Err(_) => panic!("wharf::start took over 10 s"),
    }
}

/// One fake upstream (named docker.io, the default) and one wharf in front of it.
pub struct Env {
    pub fake: FakeUpstream,
    pub dir: tempfile::TempDir,
    pub server: Option<wharf::RunningServer>,
    pub base: String,
    pub c: reqwest::Client,
    pub cache: String,
    pub upstream_extra: String,
}

impl Env {
    /// `cache`: lines for `[cache]`; `upstream_extra`: extra lines for the docker.io `[[upstream]]`.
    pub async fn start(opts: Options, cache: &str, upstream_extra: &str) -> Env {
        let fake = FakeUpstream::start(opts).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let server = start_wharf(
            dir.path(),
            cache,
            &upstream_toml("docker.io", &fake.url(), true, upstream_extra),
        )
        .await;
        let base = format!("http://{}", server.local_addr());
        Env {
            fake,
            dir,
            server: Some(server),
            base,
            c: http::client(),
            cache: cache.to_string(),
            upstream_extra: upstream_extra.to_string(),
        }
    }

    pub async fn default() -> Env {
        Env::start(Options::default(), "tag_ttl = \"5m\"", "").await
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().expect("server running").local_addr()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        self.url(&format!("/v2/{repo}/blobs/{digest}"))
    }

    pub fn manifest_url(&self, repo: &str, reference: &str) -> String {
        self.url(&format!("/v2/{repo}/manifests/{reference}"))
    }

    pub async fn get(&self, path: &str) -> Outcome {
        http::get(&self.c, &self.url(path)).await
    }

    /// Graceful stop, bounded to 15 s.
    pub async fn shutdown(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), s.shutdown())
                .await
                .expect("shutdown finished within 15 s");
        }
    }

    /// Start a new server on the same data dir (after `shutdown`), pointing at `upstream_url`.
    pub async fn restart_with(&mut self, upstream_url: &str) {
        assert!(self.server.is_none(), "shut down first");
        let s = start_wharf(
            self.dir.path(),
            &self.cache,
            &upstream_toml("docker.io", upstream_url, true, &self.upstream_extra),
        )
        .await;
        self.base = format!("http://{}", s.local_addr());
        self.c = http::client(); // old pooled connections point at the old port
        self.server = Some(s);
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(self.dir.path(), digest)
    }

    pub fn tmp_files(&self) -> Vec<PathBuf> {
        files_under(&self.dir.path().join("tmp"))
    }

    /// Poll (≤ `within`) until the blob file exists with exactly `expected` bytes.
    pub async fn wait_committed(
        &self,
        digest: &str,
        expected: &[u8],
        within: Duration,
    ) -> Result<(), String> {
        let p = self.blob_path(digest);
        let t0 = Instant::now();
        loop {
            match std::fs::read(&p) {
                Ok(b) if b == expected => return Ok(()),
                Ok(b) if t0.elapsed() > within => {
                    return Err(format!(
                        "{} has {} bytes, not the expected content",
                        p.display(),
                        b.len()
                    ))
                }
                Err(e) if t0.elapsed() > within => {
                    return Err(format!("{} not there: {e}", p.display()))
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    /// Poll (≤ `within`) until `<dir>/tmp/` holds no files.
    pub async fn wait_tmp_empty(&self, within: Duration) -> Result<(), Vec<PathBuf>> {
        let t0 = Instant::now();
        loop {
            let left = self.tmp_files();
            if left.is_empty() {
                return Ok(());
            }
            if t0.elapsed() > within {
                return Err(left);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Pull like a client: manifest by `reference`, then config and layers by digest.
    /// Checks every byte and header; returns nothing, panics with context.
    pub async fn pull(&self, client_repo: &str, reference: &str, img: &Image) {
        let m = http::get(&self.c, &self.manifest_url(client_repo, reference)).await;
        assert_eq!(
            m.status, 200,
            "manifest {client_repo}:{reference}: {:?}",
            m.body
        );
        assert_eq!(
            m.bytes(),
            img.manifest,
            "manifest bytes must be upstream's, untouched"
        );
        assert_eq!(
            m.header("content-type").as_deref(),
            Some(img.media_type.as_str()),
            "manifest Content-Type"
        );
        assert_eq!(
            m.header("docker-content-digest").as_deref(),
            Some(img.manifest_digest.as_str())
        );
        let v = m.json();
        let mut digests = vec![v["config"]["digest"]
            .as_str()
            .expect("config digest")
            .to_string()];
        for l in v["layers"].as_array().expect("layers") {
            digests.push(l["digest"].as_str().expect("layer digest").to_string());
        }
        for d in digests {
            let b = http::get(&self.c, &self.blob_url(client_repo, &d)).await;
            assert_eq!(
                b.status,
                200,
                "blob {d}: {:?}",
                b.body
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
            );
            let bytes = b.bytes();
            assert_eq!(
                format!("sha256:{}", http::sha256_hex(&bytes)),
                d,
                "blob bytes must hash to their digest"
            );
            assert_eq!(
                b.header("content-length"),
                Some(bytes.len().to_string()),
                "blob Content-Length"
            );
        }
    }
}

pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    dir.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

/// Every regular file under `dir`, recursively (bounded depth), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        if depth > 8 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&p, depth + 1, out),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out.sort();
    out
}
