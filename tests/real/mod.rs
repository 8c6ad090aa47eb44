//! Harness for the real-program end-to-end suite (`tests/e2e_real.rs`).
//!
//! A `Fixture` is one isolated world per test: a temp dir, a token server in
//! the test process, two docker-registry processes (open for seeding, token
//! auth for pulling) sharing one storage root, the seeded test images, and
//! wharf in front of the authed registry. containerd and dockerd are started
//! by the tests that need them. Everything is killed by PID on drop.
//!
//! `WHARF_E2E_DIRECT=1` points the clients at the token-auth registry instead
//! of wharf, to check the harness itself. `WHARF_E2E_KEEP=1` keeps the temp
//! dirs (logs, configs) after the run.
#![allow(dead_code)]

pub mod containerd;
pub mod dockerd;
pub mod images;
pub mod procs;
pub mod token;
pub mod upstream;
pub mod util;
pub mod wharf;

use std::path::{Path, PathBuf};

use images::TestImages;
use upstream::Upstream;
use wharf::{Wharf, WharfOpts};

pub fn direct_mode() -> bool {
    std::env::var("WHARF_E2E_DIRECT").is_ok_and(|v| v == "1")
}

pub struct Fixture {
    // Field order is drop order: wharf, then the upstream, then the runtime
    // serving the token endpoint, then the directory.
    pub wharf: Option<Wharf>,
    pub upstream: Upstream,
    pub rt: tokio::runtime::Runtime,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub images: &'static TestImages,
    pub started: std::time::Instant,
}

impl Fixture {
    /// Start and seed the upstream, then wharf (unless in direct mode).
    pub fn start(test: &str) -> Fixture {
        Fixture::start_with(test, &WharfOpts::default())
    }

    /// `start`, with wharf's config built from `opts`.
    pub fn start_with(test: &str, opts: &WharfOpts) -> Fixture {
        Fixture::start_ready(test, opts, 200)
    }

    /// `start_with`, wharf being ready once `GET /v2/` answers
    /// `ready_status` (401 when its default upstream requires client auth).
    pub fn start_ready(test: &str, opts: &WharfOpts, ready_status: u16) -> Fixture {
        let started = std::time::Instant::now();
        util::require_root();
        // Fail fast with the setup hint if anything is missing.
        for p in ["docker-registry", "openssl"] {
            util::find_program(p);
        }
        // Short paths: unix sockets live under here.
        let dir = tempfile::Builder::new()
            .prefix(&format!("wharf-e2e-{test}-"))
            .tempdir_in("/tmp")
            .expect("temp dir");
        let path = dir.path().to_path_buf();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let images = images::get();
        let upstream = Upstream::start(&rt, &path.join("upstream"));
        upstream.seed(&rt, &images.all());
        let wharf = if direct_mode() {
            eprintln!(
                "[{test}] WHARF_E2E_DIRECT=1: clients talk to the token registry {} directly",
                upstream.authed.addr
            );
            None
        } else {
            Some(Wharf::start_ready(
                &path.join("wharf"),
                &upstream.authed.url(),
                opts,
                ready_status,
            ))
        };
        eprintln!(
            "[{test}] fixture up in {:.1?} at {}",
            started.elapsed(),
            path.display()
        );
        Fixture {
            wharf,
            upstream,
            rt,
            dir: Some(dir),
            path,
            images,
            started,
        }
    }

    pub fn dir(&self, sub: &str) -> PathBuf {
        let p = self.path.join(sub);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    pub fn root(&self) -> &Path {
        &self.path
    }

    /// `127.0.0.1:PORT` the clients use as their registry / mirror.
    pub fn mirror_addr(&self) -> String {
        match &self.wharf {
            Some(w) => w.addr.clone(),
            None => self.upstream.authed.addr.clone(),
        }
    }

    /// `http://127.0.0.1:PORT`, or `https://` when wharf serves TLS.
    pub fn mirror_url(&self) -> String {
        match &self.wharf {
            Some(w) => w.url(),
            None => format!("http://{}", self.mirror_addr()),
        }
    }

    /// Log tails of wharf and the upstream, for panic messages.
    pub fn diag(&self) -> String {
        let w = self
            .wharf
            .as_ref()
            .map(|w| w.logs())
            .unwrap_or_else(|| "(direct mode: no wharf)".into());
        format!("{w}\n{}", self.upstream.logs())
    }

    /// Panic with logs if wharf died.
    pub fn assert_wharf_alive(&mut self) {
        if let Some(w) = self.wharf.as_mut() {
            w.proc.assert_alive();
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.wharf.take();
        // Registries and the token server are dropped with the struct; the
        // directory goes last, after any stray mounts are released.
        util::unmount_under(&self.path);
        if std::env::var("WHARF_E2E_KEEP").is_ok_and(|v| v == "1") {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}
