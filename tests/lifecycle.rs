//! Cache lifecycle against the fake upstream: the byte budget and LRU
//! eviction, pins on blobs being read, blobs bigger than the budget,
//! `kill -9` mid-fill and restart (with and without the index), and a disk
//! that fills up mid-fill.

mod common;
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::{self, sha256_hex};
use harness::*;

const MIB: usize = 1 << 20;

/// Bytes in committed blob files under `dir`.
fn blob_bytes_on_disk(dir: &Path) -> u64 {
    files_under(&dir.join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

async fn start_budgeted(dir: &Path, upstream: &str, max_size: &str) -> wharf::RunningServer {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[storage]\ndir = \"{}\"\nmax_size = \"{max_size}\"\n{}",
        dir.display(),
        upstream_toml("docker.io", upstream, true, "")
    );
    let config = wharf::config::Config::from_toml_str(&text).expect("config");
    wharf::start(config).await.expect("start")
}

/// Polls `check` every 25 ms for up to 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !check() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_disk_and_index_within_the_budget() {
    let fake = FakeUpstream::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_budgeted(dir.path(), &fake.url(), "4MiB").await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let max = 4 * MIB as u64;
    let images: Vec<Image> = (0..5)
        .map(|i| {
            fake.add_image(
                &format!("library/img{i}"),
                Some("1"),
                &[
                    pseudo_random_bytes(100 + i, 600_000),
                    pseudo_random_bytes(200 + i, 400_000),
                ],
            )
        })
        .collect();
    for (i, img) in images.iter().enumerate() {
        let blobs = std::iter::once(img.config_digest.clone())
            .chain(img.layers.iter().map(|(d, _)| d.clone()));
        for digest in blobs {
            let out = http::get(&c, &format!("{base}/v2/library/img{i}/blobs/{digest}")).await;
            assert_eq!(out.status, 200);
            assert_eq!(format!("sha256:{}", sha256_hex(&out.bytes())), digest);
        }
        // Eviction settles at or below the high watermark (90 %).
        eventually("disk usage back under the high watermark", || {
            blob_bytes_on_disk(dir.path()) <= max * 9 / 10
        })
        .await;
    }
    // Five 1 MB images went through a 4 MiB budget: the oldest were evicted
    // down to the low watermark (80 %), the newest is still cached.
    let on_disk = blob_bytes_on_disk(dir.path());
    assert!(
        on_disk <= (max as f64 * 0.9) as u64,
        "{on_disk} bytes on disk"
    );
    assert!(
        on_disk >= 2_000_000,
        "evicted far more than needed: {on_disk} bytes left"
    );
    let newest = &images[4].layers[0].0;
    let before = fake.blob_gets(newest);
    assert_eq!(
        http::get(&c, &format!("{base}/v2/library/img4/blobs/{newest}"))
            .await
            .status,
        200
    );
    assert_eq!(
        fake.blob_gets(newest),
        before,
        "the most recent blob must still be cached"
    );
    let oldest = &images[0].layers[0].0;
    assert!(
        !blob_path(dir.path(), oldest).exists(),
        "the least recently used blob must be gone"
    );
    assert_eq!(
        http::get(&c, &format!("{base}/v2/library/img0/blobs/{oldest}"))
            .await
            .status,
        200
    );
    assert_eq!(
        fake.blob_gets(oldest),
        2,
        "an evicted blob is simply a miss again"
    );

    tokio::time::timeout(Duration::from_secs(15), server.shutdown())
        .await
        .unwrap();
    let index = wharf::index::Index::open(&dir.path().join("index.redb")).unwrap();
    let (count, bytes) = index.blob_totals().unwrap();
    assert_eq!(
        bytes,
        blob_bytes_on_disk(dir.path()),
        "the index agrees with the disk"
    );
    assert_eq!(count as usize, files_under(&dir.path().join("blobs")).len());
    assert!(bytes <= max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_read_is_not_evicted() {
    let fake = FakeUpstream::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_budgeted(dir.path(), &fake.url(), "40MiB").await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let a_bytes = pseudo_random_bytes(1, 16 * MIB);
    let a = fake.add_blob("library/a", a_bytes.clone());
    assert_eq!(
        http::get(&c, &format!("{base}/v2/library/a/blobs/{a}"))
            .await
            .bytes(),
        a_bytes
    );

    // A slow reader of A: it takes one chunk and then keeps the response open.
    let mut reading = c
        .get(format!("{base}/v2/library/a/blobs/{a}"))
        .send()
        .await
        .unwrap();
    assert!(reading.chunk().await.unwrap().is_some());

    let b = fake.add_blob("library/a", pseudo_random_bytes(2, 12 * MIB));
    let cc = fake.add_blob("library/a", pseudo_random_bytes(3, 12 * MIB));
    for d in [&b, &cc] {
        assert_eq!(
            http::get(&c, &format!("{base}/v2/library/a/blobs/{d}"))
                .await
                .status,
            200
        );
    }
    // 40 MiB passed the 36 MiB high watermark: something had to go, and it
    // was not A, although A is the least recently used.
    eventually("eviction down to the low watermark", || {
        blob_bytes_on_disk(dir.path()) <= 32 * MIB as u64
    })
    .await;
    assert!(
        blob_path(dir.path(), &a).exists(),
        "a blob being read was evicted"
    );
    assert!(
        !blob_path(dir.path(), &b).exists(),
        "the unpinned least recently used blob should have gone"
    );

    // The slow reader still gets every byte.
    let mut rest = 0;
    while let Some(chunk) = reading.chunk().await.unwrap() {
        rest += chunk.len();
    }
    assert!(rest > 0);
    drop(reading);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_budget_is_served_but_not_kept() {
    let fake = FakeUpstream::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_budgeted(dir.path(), &fake.url(), "1MiB").await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let big = pseudo_random_bytes(9, 3 * MIB);
    let d = fake.add_blob("library/big", big.clone());
    let out = http::get(&c, &format!("{base}/v2/library/big/blobs/{d}")).await;
    assert_eq!(out.status, 200);
    assert_eq!(out.bytes(), big);
    assert_eq!(out.header("content-length"), Some(big.len().to_string()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blob_path(dir.path(), &d).exists());
    assert!(files_under(&dir.path().join("tmp")).is_empty());
    assert_eq!(
        http::get(&c, &format!("{base}/v2/library/big/blobs/{d}"))
            .await
            .bytes(),
        big
    );
    assert_eq!(fake.blob_gets(&d), 2, "not kept, so fetched again");
    server.shutdown().await;
}

/// The wharf binary, killed with SIGKILL when dropped.
struct WharfProcess {
    child: Child,
    base: String,
}

impl WharfProcess {
    fn start(dir: &Path, upstream: &str) -> WharfProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .arg("--upstream")
            .arg(format!("docker.io={upstream}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn wharf");
        let addr = common::listening_addr(&mut child);
        WharfProcess {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
}

impl Drop for WharfProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("tmp"))
}

/// Starts three slow fills of `digest` and waits until its temp file has data.
async fn fills_in_flight(c: &reqwest::Client, wharf: &WharfProcess, dir: &Path, digest: &str) {
    for _ in 0..3 {
        let url = format!("{}/v2/library/crash/blobs/{digest}", wharf.base);
        let c = c.clone();
        tokio::spawn(async move {
            let _ = c.get(url).send().await.map(|r| r.bytes());
        });
    }
    eventually("a temp file with data", || {
        tmp_files(dir)
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_fill_then_restart_serves_right_digests() {
    let fake = FakeUpstream::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = http::client();
    let committed = pseudo_random_bytes(20, 2 * MIB);
    let committed_digest = fake.add_blob("library/crash", committed.clone());
    let large = pseudo_random_bytes(21, 16 * MIB);
    let large_digest = fake.add_blob("library/crash", large.clone());
    fake.throttle(&large_digest, 64 * 1024, Duration::from_millis(20));

    let wharf = WharfProcess::start(dir.path(), &fake.url());
    let url = |w: &WharfProcess, d: &str| format!("{}/v2/library/crash/blobs/{d}", w.base);
    assert_eq!(
        http::get(&c, &url(&wharf, &committed_digest)).await.bytes(),
        committed
    );
    fills_in_flight(&c, &wharf, dir.path(), &large_digest).await;
    wharf.kill9();
    assert!(
        !tmp_files(dir.path()).is_empty(),
        "the kill must land mid-fill"
    );

    // Restart: temp files gone, nothing half-written committed, old blob intact.
    let wharf = WharfProcess::start(dir.path(), &fake.url());
    assert!(
        tmp_files(dir.path()).is_empty(),
        "temp files survived a restart: {:?}",
        tmp_files(dir.path())
    );
    assert!(!blob_path(dir.path(), &large_digest).exists());
    let gets = fake.blob_gets(&committed_digest);
    assert_eq!(
        http::get(&c, &url(&wharf, &committed_digest)).await.bytes(),
        committed
    );
    assert_eq!(
        fake.blob_gets(&committed_digest),
        gets,
        "a committed blob is served from disk"
    );

    // Kill again mid-fill, and this time lose the index too.
    fills_in_flight(&c, &wharf, dir.path(), &large_digest).await;
    wharf.kill9();
    std::fs::remove_file(dir.path().join("index.redb")).unwrap();
    fake.clear_throttle(&large_digest);
    let wharf = WharfProcess::start(dir.path(), &fake.url());
    assert!(tmp_files(dir.path()).is_empty());
    assert_eq!(
        http::get(&c, &url(&wharf, &committed_digest)).await.bytes(),
        committed
    );
    assert_eq!(
        fake.blob_gets(&committed_digest),
        gets,
        "the rebuilt index still knows the committed blob"
    );
    let out = http::get(&c, &url(&wharf, &large_digest)).await;
    assert_eq!(format!("sha256:{}", sha256_hex(&out.bytes())), large_digest);
    drop(wharf);
    let index = wharf::index::Index::open(&dir.path().join("index.redb")).unwrap();
    assert_eq!(
        index.blob_totals().unwrap(),
        (2, (committed.len() + large.len()) as u64)
    );
}

/// A tmpfs mounted for one test; unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_switches_misses_to_streaming() {
    let disk = SmallDisk::mount("4m");
    let fake = FakeUpstream::start(Options::default()).await;
    let server = start_budgeted(disk.0.path(), &fake.url(), "1GiB").await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let big = pseudo_random_bytes(30, 8 * MIB);
    let d = fake.add_blob("library/full", big.clone());

    // The fill runs out of disk mid-way: that response is cut, never completed wrong.
    let first = http::get(&c, &format!("{base}/v2/library/full/blobs/{d}")).await;
    assert!(
        !first.looks_complete_ok(),
        "a fill that hit ENOSPC cannot have completed"
    );
    assert!(!blob_path(disk.0.path(), &d).exists());
    // The client retries and now gets every byte, streamed past the full disk.
    let retry = http::get(&c, &format!("{base}/v2/library/full/blobs/{d}")).await;
    assert_eq!(retry.status, 200);
    assert_eq!(retry.bytes(), big);
    // A Range retry, as containerd resumes, works too.
    let ranged = http::get_range(
        &c,
        &format!("{base}/v2/library/full/blobs/{d}"),
        "bytes=100-199",
    )
    .await;
    assert_eq!(ranged.status, 206);
    assert_eq!(&ranged.bytes()[..], &big[100..200]);
    assert!(tmp_files(disk.0.path()).is_empty());
    server.shutdown().await;
}

/// After a refused connection, requests fail fast for a while instead of
/// each trying (and, for a black-holed host, waiting out connect_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_fails_fast_without_new_connection_attempts() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let server = start_budgeted(dir.path(), &format!("http://127.0.0.1:{port}"), "1GiB").await;
    let c = http::client();
    let url = format!("http://{}/v2/library/x/manifests/1", server.local_addr());
    let refused = http::get(&c, &url).await;
    assert_eq!(refused.status, 502);
    assert!(format!("{:?}", refused.body).contains("Connection refused"));

    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let fast = http::get(&c, &url).await;
    assert_eq!(fast.status, 503);
    assert_eq!(fast.error_code().as_deref(), Some("UNAVAILABLE"));
    assert!(format!("{:?}", fast.body).contains("upstream docker.io: upstream unavailable"));
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(
        listener.accept().is_err(),
        "wharf tried to connect during the cool-down"
    );
    server.shutdown().await;
}
