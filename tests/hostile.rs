//! wharf in-process against hostile clients: oversized heads, path
//! traversal, malformed digests, absurd Range lists, slowloris, connection
//! floods, greedy clients and fill storms; and an upstream that sends more
//! body than its Content-Length. Every case checks the server still serves
//! a normal pull afterwards.

mod common;
mod harness;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::{self, *};
use harness::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECOND: Duration = Duration::from_secs(1);
const HEALTH_REPO: &str = "library/health";

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

/// A client that opens a fresh connection per request: pooled connections
/// would count against `max_connections` and race the server's idle close.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// A fresh-connection client whose requests come from `source` (any 127.0.0.x).
fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .local_address(Some(source.parse().expect("source address")))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// wharf with `limits` as its `[limits]` table, in front of a fresh fake
/// upstream that already holds a small image for [`assert_healthy`]. The
/// data dir is the only thing inside the returned root dir, so a file
/// written beside it would show.
async fn start(limits: &str) -> (Env, Image, tempfile::TempDir) {
    start_with("", limits).await
}

/// [`start`] with extra `[server]` lines too.
async fn start_with(server: &str, limits: &str) -> (Env, Image, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir_in(root.path()).expect("data dir");
    let fake = FakeUpstream::start(Options::default()).await;
    let health = fake.add_image(
        HEALTH_REPO,
        Some("v1"),
        &[pseudo_random_bytes(4242, 70_000), b"small layer".to_vec()],
    );
    let cache = "tag_ttl = \"5m\"";
    // TOML tables may come in any order: [limits] after [[upstream]] is fine.
    let text = format!(
        "{}\n[limits]\n{limits}\n",
        config_text(
            dir.path(),
            cache,
            &upstream_toml("docker.io", &fake.url(), true, "")
        )
        .replacen("[server]\n", &format!("[server]\n{server}\n"), 1)
    );
    let cfg = wharf::config::Config::from_toml_str(&text)
        .unwrap_or_else(|e| panic!("config rejected: {e:?}\n{text}"));
    let server = match tokio::time::timeout(10 * SECOND, wharf::start(cfg)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("wharf::start failed: {e:?}\n{text}"),
        Err(_) => panic!("wharf::start took over 10 s"),
    };
    let base = format!("http://{}", server.local_addr());
    let env = Env {
        fake,
        dir,
        server: Some(server),
        base,
        c: fresh_client(),
        cache: cache.to_string(),
        upstream_extra: String::new(),
    };
    (env, health, root)
}

/// The server still works normally: the version check answers 200 and a
/// whole image (manifest, config, layers) pulls with the right bytes.
async fn assert_healthy(env: &Env, img: &Image, after: &str) {
    let t0 = Instant::now();
    let v = http::get(&fresh_client(), &env.url("/v2/")).await;
    assert_eq!(v.status, 200, "GET /v2/ after {after}: {:?}", v.body);
    env.pull(HEALTH_REPO, "v1", img).await;
    assert!(
        t0.elapsed() < 5 * SECOND,
        "a normal pull after {after} took {:?}",
        t0.elapsed()
    );
}

/// `wharf_rejected_total{reason=...}` from the admin listener's /metrics.
async fn rejected(env: &Env, reason: &str) -> f64 {
    let admin = env.server.as_ref().expect("running").admin_addr();
    let out = http::get(&fresh_client(), &format!("http://{admin}/metrics")).await;
    assert_eq!(out.status, 200, "admin /metrics");
    let text = String::from_utf8(out.bytes().to_vec()).expect("utf-8 metrics");
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("wharf_rejected_total{") && l.contains(&label))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("bad sample {l:?}"))
        })
        .sum()
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------

/// How the server ended a raw exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Closed cleanly (FIN).
    Eof,
    /// Reset (RST), or another read error.
    Reset,
    /// Still open when we stopped waiting.
    Open,
}

#[derive(Debug)]
struct Raw {
    bytes: Vec<u8>,
    end: End,
    /// From connect until the end (or until we stopped waiting).
    took: Duration,
}

impl Raw {
    fn head_len(&self) -> Option<usize> {
        self.bytes.windows(4).position(|w| w == b"\r\n\r\n")
    }
    fn head(&self) -> String {
        let end = self.head_len().unwrap_or(self.bytes.len());
        String::from_utf8_lossy(&self.bytes[..end]).to_string()
    }
    fn status(&self) -> Option<u16> {
        let head = self.head();
        let line = head.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.head().lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    fn body(&self) -> &[u8] {
        match self.head_len() {
            Some(n) => &self.bytes[n + 4..],
            None => &[],
        }
    }
    /// The first `errors[].code` of an OCI error body (plain or chunked).
    fn error_code(&self) -> Option<String> {
        let s = String::from_utf8_lossy(self.body()).to_string();
        let v: serde_json::Value = serde_json::from_str(&s[s.find('{')?..=s.rfind('}')?]).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
    fn describe(&self) -> String {
        let shown: String = String::from_utf8_lossy(&self.bytes)
            .chars()
            .take(300)
            .collect();
        format!(
            "{} bytes then {:?} after {:?}: {shown:?}",
            self.bytes.len(),
            self.end,
            self.took
        )
    }
}

/// Reads until the peer closes or `deadline`.
async fn read_until_closed(rd: &mut (impl AsyncRead + Unpin), deadline: Instant) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::from_std(deadline);
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Err(_) => return (out, End::Open),
            Ok(Ok(0)) => return (out, End::Eof),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return (out, End::Reset),
        }
    }
}

/// Sends `request` byte for byte on a new connection while reading what
/// comes back, until the server closes or `wait` passes. The write half
/// stays open throughout: a FIN from us could end the exchange early.
async fn exchange(addr: SocketAddr, request: Vec<u8>, wait: Duration) -> Raw {
    let t0 = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        // The server may stop reading and close mid-write: that is an answer too.
        let _ = wr.write_all(&request).await;
        wr
    });
    let (bytes, end) = read_until_closed(&mut rd, t0 + wait).await;
    let took = t0.elapsed();
    writer.abort();
    Raw { bytes, end, took }
}

/// `GET target` with `Connection: close` and extra header lines, raw.
fn get_request(target: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut r = b"GET ".to_vec();
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: wharf.test\r\nConnection: close\r\n");
    for (k, v) in extra {
        r.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

async fn raw_get(addr: SocketAddr, target: &str, extra: &[(&str, &str)]) -> Raw {
    exchange(addr, get_request(target.as_bytes(), extra), 10 * SECOND).await
}

/// Whether `stream` is still open after `wait` with nothing to read.
async fn still_open(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 256];
    // Neither bytes nor a close before the timeout: open.
    tokio::time::timeout(wait, stream.read(&mut b))
        .await
        .is_err()
}

// ---------------------------------------------------------------------------
// 1. Oversized heads
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_urls_are_refused_and_the_server_still_serves() {
    // Defaults: max_header_size 32 KiB, max_url_length 8 KiB, so hyper reads
    // heads up to 32768 + 8192 + 256 = 41216 bytes.
    let (env, health, _root) = start("").await;
    let addr = env.addr();
    let c = fresh_client();

    // Just under the header limit (by wharf's count, name + value + 4 per
    // header, Host included): served.
    let r = http::send(c.get(env.url("/v2/")).header("x-pad", "a".repeat(30_000)))
        .await
        .expect("request under the header limit");
    assert_eq!(r.status, 200, "30 KB of headers is within 32 KiB");

    // One header over the limit: wharf's own 431 with an OCI body.
    let r = http::send(c.get(env.url("/v2/")).header("x-big", "a".repeat(36_000)))
        .await
        .expect("a 431 is still a response");
    assert_eq!(r.status, 431, "36 KB header: {:?}", r.body);
    assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"));

    // Many headers that only add up to too much: 90 × ~400 bytes.
    let mut req = c.get(env.url("/v2/library/alpine/manifests/latest"));
    for i in 0..90 {
        req = req.header(format!("x-h{i}"), "b".repeat(400));
    }
    let r = http::send(req).await.expect("a 431 is still a response");
    assert_eq!(r.status, 431, "90 headers of 400 bytes: {:?}", r.body);
    assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"));

    // More header lines than hyper parses (100), each tiny: hyper's own 431.
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-n{i}"), "1".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw_get(addr, "/v2/", &many).await;
    assert_eq!(r.status(), Some(431), "150 header lines: {}", r.describe());
    assert!(r.body().is_empty(), "hyper's 431 has no body");

    // URL just under 8 KiB: served; over it: wharf's 414 with an OCI body.
    let under = format!("/v2/?pad={}", "a".repeat(8_000));
    let r = raw_get(addr, &under, &[]).await;
    assert_eq!(r.status(), Some(200), "8 KB URL: {}", r.describe());
    let over = format!(
        "/v2/library/alpine/manifests/latest?pad={}",
        "a".repeat(9_000)
    );
    let r = raw_get(addr, &over, &[]).await;
    assert_eq!(r.status(), Some(414), "9 KB URL: {}", r.describe());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"));
    // 30 KB still fits hyper's buffer: wharf's 414.
    let r = raw_get(addr, &format!("/v2/?pad={}", "a".repeat(30_000)), &[]).await;
    assert_eq!(r.status(), Some(414), "30 KB URL: {}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("UNSUPPORTED"));
    // A URL longer than hyper's whole head buffer never parses: hyper's
    // 431 (head too large), not a 414, with no body, then the close.
    let r = raw_get(addr, &format!("/v2/?pad={}", "a".repeat(70_000)), &[]).await;
    eprintln!("70 KB URL: {}", r.describe());
    assert_eq!(r.status(), Some(431), "70 KB URL: {}", r.describe());
    assert!(r.body().is_empty(), "hyper's 431 has no body");
    assert_ne!(r.end, End::Open, "connection closed after hyper's 431");

    // A 200 KiB header, far beyond the head buffer: hyper answers 431 as
    // soon as its buffer is full and closes (FIN; a RST may follow for the
    // part of our head it never read).
    let big = "c".repeat(200 * 1024);
    let r = raw_get(addr, "/v2/", &[("x-huge", &big)]).await;
    eprintln!("200 KiB header: {}", r.describe());
    assert_eq!(r.status(), Some(431), "200 KiB header: {}", r.describe());
    assert!(r.body().is_empty(), "hyper's 431 has no body");
    assert_ne!(r.end, End::Open, "connection closed: {}", r.describe());
    assert!(r.took < 5 * SECOND, "answered promptly: {:?}", r.took);

    // Counted: wharf's own two 431s and two 414s. hyper's refusals never
    // reach wharf, so they are not.
    assert_eq!(rejected(&env, "header_size").await, 2.0);
    assert_eq!(rejected(&env, "url_length").await, 2.0);
    assert_eq!(
        env.fake.total_requests(),
        0,
        "no refused request reached upstream"
    );
    assert_healthy(&env, &health, "oversized heads").await;
}

// ---------------------------------------------------------------------------
// 2. Names and path traversal
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_and_malformed_names_never_reach_upstream_or_disk() {
    let (env, health, root) = start("").await;
    let addr = env.addr();
    let files_before = files_under(env.dir.path());
    let d = digest_of(b"anything");
    let deep = format!("/v2/{}manifests/latest", "a/".repeat(300));
    let long_component = format!("/v2/{}/manifests/latest", "a".repeat(256));

    // (target, expected status, expected OCI code)
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("/v2/../../etc/passwd/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/library/../../../etc/passwd/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/docker.io/../../etc/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/%2e%2e/%2e%2e/etc/passwd/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/%2E%2E/alpine/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (format!("/v2/..%2f..%2fetc/blobs/{d}"), 400, "NAME_INVALID"),
        (format!("/v2/..%5c..%5cetc/blobs/{d}"), 400, "NAME_INVALID"),
        (format!("/v2/..\\..\\etc/blobs/{d}"), 400, "NAME_INVALID"),
        (
            "/v2/library/alpine%00/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            format!("/v2/library/x%00.tar/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/Library/Alpine/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (deep, 400, "NAME_INVALID"),
        (long_component, 400, "NAME_INVALID"),
        (format!("/v2//etc/passwd/blobs/{d}"), 400, "NAME_INVALID"),
        (
            "/v2/./library/alpine/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            format!("http://127.0.0.1:1/v2/../../etc/blobs/{d}"),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/alpine/manifests/..%2f..%2fetc%2fpasswd".into(),
            400,
            "TAG_INVALID",
        ),
        // `..` after the endpoint word makes it no endpoint at all.
        (
            "/v2/library/alpine/manifests/../../../etc/passwd".into(),
            404,
            "UNSUPPORTED",
        ),
        (
            "/v2/library/alpine/blobs/../../../../etc/passwd".into(),
            404,
            "UNSUPPORTED",
        ),
        // An upstream chosen by ?ns= must be a configured one, verbatim.
        (
            "/v2/library/alpine/manifests/latest?ns=../../etc".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "/v2/library/alpine/manifests/latest?ns=docker.io%2f..%2f..".into(),
            404,
            "NAME_UNKNOWN",
        ),
    ];
    for (target, status, code) in &cases {
        for method in ["GET", "HEAD"] {
            let mut req = get_request(target.as_bytes(), &[]);
            if method == "HEAD" {
                req.splice(0..3, *b"HEAD");
            }
            let r = exchange(addr, req, 10 * SECOND).await;
            assert_eq!(
                r.status(),
                Some(*status),
                "{method} {}: {}",
                &target[..target.len().min(120)],
                r.describe()
            );
            if method == "GET" {
                assert_eq!(
                    r.error_code().as_deref(),
                    Some(*code),
                    "{method} {}: {}",
                    &target[..target.len().min(120)],
                    r.describe()
                );
            }
        }
    }

    // Bytes no request line may hold: hyper's own bare 400.
    for target in [
        &b"/v2/library/al\0pine/manifests/latest"[..],
        &b"/v2/../../etc/pass\0wd/blobs/sha256:00"[..],
        &b"/v2/library/alpine/manifests/lat est"[..],
    ] {
        let r = exchange(addr, get_request(target, &[]), 10 * SECOND).await;
        assert_eq!(
            r.status(),
            Some(400),
            "{:?}: {}",
            String::from_utf8_lossy(target),
            r.describe()
        );
        eprintln!("{:?}: {}", String::from_utf8_lossy(target), r.describe());
        assert_eq!(r.error_code(), None, "hyper's 400 carries no OCI body");
    }

    assert_eq!(
        env.fake.total_requests(),
        0,
        "no malformed name may reach upstream: {:?}",
        env.fake
            .requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        files_under(env.dir.path()),
        files_before,
        "malformed requests created files in the data dir"
    );
    let beside: Vec<PathBuf> = std::fs::read_dir(root.path())
        .expect("read root")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        beside,
        vec![env.dir.path().to_path_buf()],
        "only the data dir lives beside the data dir"
    );

    assert_healthy(&env, &health, "path traversal attempts").await;
    // The pull added its manifest under manifests/ and its blobs under
    // blobs/, each at sha256/xx/<hex>, and nothing else.
    let dir = env.dir.path();
    let mut expected = files_before.clone();
    expected.push(
        dir.join("manifests").join(
            blob_path(dir, &health.manifest_digest)
                .strip_prefix(dir.join("blobs"))
                .expect("under blobs"),
        ),
    );
    expected.push(blob_path(dir, &health.config_digest));
    expected.extend(health.layers.iter().map(|(d, _)| blob_path(dir, d)));
    expected.sort();
    assert_eq!(files_under(dir), expected, "the data dir after one pull");
}

// ---------------------------------------------------------------------------
// 3. Digests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_digests_are_rejected_without_touching_upstream() {
    let (env, health, _root) = start("").await;
    let addr = env.addr();
    let real = env
        .fake
        .add_blob("library/alpine", pseudo_random_bytes(77, 1000));
    let hex = real.strip_prefix("sha256:").expect("sha256").to_string();
    let with_colon = vec![
        "md5:d41d8cd98f00b204e9800998ecf8427e".to_string(),
        format!("sha256:{}", &hex[..63]),
        format!("sha256:{hex}0"),
        format!("sha256:{}", hex.to_uppercase()),
        format!("SHA256:{hex}"),
        format!("sha512:{hex}"),
        format!("sha512:{hex}{}", &hex[..63]),
        format!("sha256:{}g", &hex[..63]),
        "sha256:".to_string(),
        format!(":{hex}"),
        format!("sha256:{hex}%00"),
        format!("sha256:{}%2f..%2f..", &hex[..56]),
        "sha256:%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_string(),
        format!("sha256+b64:{hex}"),
        format!("sha256:{hex}:{hex}"),
    ];
    let mut targets: Vec<String> = Vec::new();
    for dg in &with_colon {
        targets.push(format!("/v2/library/alpine/blobs/{dg}"));
        targets.push(format!("/v2/library/alpine/manifests/{dg}"));
        targets.push(format!("/v2/library/alpine/referrers/{dg}"));
    }
    // Without a colon a manifest reference is a tag; a blob needs a digest.
    targets.push(format!("/v2/library/alpine/blobs/{hex}"));
    targets.push("/v2/library/alpine/blobs/sha256".into());
    for target in &targets {
        for method in ["GET", "HEAD"] {
            let mut req = get_request(target.as_bytes(), &[]);
            if method == "HEAD" {
                req.splice(0..3, *b"HEAD");
            }
            let r = exchange(addr, req, 10 * SECOND).await;
            assert_eq!(r.status(), Some(400), "{method} {target}: {}", r.describe());
            if method == "GET" {
                assert_eq!(
                    r.error_code().as_deref(),
                    Some("DIGEST_INVALID"),
                    "{method} {target}: {}",
                    r.describe()
                );
            }
        }
    }
    assert_eq!(
        env.fake.total_requests(),
        0,
        "a malformed digest reached upstream: {:?}",
        env.fake
            .requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    assert!(env.tmp_files().is_empty(), "no fill was started");
    // The well-formed digest still works.
    let ok = http::get(&env.c, &env.blob_url("library/alpine", &real)).await;
    assert_eq!(ok.status, 200);
    assert_eq!(digest_of(&ok.bytes()), real);
    assert_healthy(&env, &health, "malformed digests").await;
}

// ---------------------------------------------------------------------------
// 4. Range
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_range_headers_get_the_whole_blob_quickly() {
    let (env, health, _root) = start("").await;
    let data = pseudo_random_bytes(5, 1 << 20);
    let d = env.fake.add_blob("library/big", data.clone());
    let url = env.blob_url("library/big", &d);
    let first = http::get(&env.c, &url).await;
    assert_eq!(first.bytes(), data);
    env.wait_committed(&d, &data, 5 * SECOND)
        .await
        .expect("blob cached");

    let many_ranges = format!(
        "bytes={}",
        (0..3000)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let headers: Vec<(&str, String)> = vec![
        ("3000 one-byte ranges", many_ranges),
        (
            "5000 overlapping open ranges",
            format!("bytes={}", "0-,".repeat(5000)),
        ),
        (
            "3000 suffix ranges",
            format!("bytes={}", "-1,".repeat(3000)),
        ),
        (
            "a 30000-digit start",
            format!("bytes={}-1", "9".repeat(30_000)),
        ),
        (
            "a 30000-digit suffix",
            format!("bytes=-{}", "9".repeat(30_000)),
        ),
        ("30000 dashes", format!("bytes={}", "-".repeat(30_000))),
        ("30000 commas", format!("bytes={}", ",".repeat(30_000))),
    ];
    for (what, range) in &headers {
        assert!(range.len() < 31_000, "{what} stays under max_header_size");
        let t0 = Instant::now();
        let r = get_range(&env.c, &url, range).await;
        let took = t0.elapsed();
        eprintln!(
            "Range with {what} ({} bytes): {} in {took:?}",
            range.len(),
            r.status
        );
        assert_eq!(r.status, 200, "{what}: whole blob");
        assert_eq!(r.header("content-range"), None, "{what}");
        assert_eq!(
            r.header("content-length"),
            Some(data.len().to_string()),
            "{what}"
        );
        assert_eq!(digest_of(&r.bytes()), d, "{what}: the right bytes");
        assert!(took < 2 * SECOND, "{what} took {took:?}");
    }
    assert_eq!(
        env.fake.blob_gets(&d),
        1,
        "every Range was served from cache"
    );
    assert_healthy(&env, &health, "absurd Range headers").await;
}

// ---------------------------------------------------------------------------
// 5. Slow and idle clients
// ---------------------------------------------------------------------------

/// Opens a connection that sends a request head one byte every 200 ms and
/// never finishes it; returns what came back and when it was closed.
async fn slowloris(addr: SocketAddr, limit: Duration) -> Raw {
    let t0 = Instant::now();
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await;
        for _ in 0..(limit.as_millis() / 200) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b"a").await.is_err() {
                break;
            }
        }
        wr
    });
    let (bytes, end) = read_until_closed(&mut rd, t0 + limit).await;
    let took = t0.elapsed();
    writer.abort();
    Raw { bytes, end, took }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_are_cut_off_after_header_timeout() {
    let (env, health, _root) = start("header_timeout = \"1s\"").await;
    let addr = env.addr();
    let slow: Vec<_> = (0..10)
        .map(|_| tokio::spawn(slowloris(addr, 6 * SECOND)))
        .collect();

    // Meanwhile other connections are served promptly.
    let c = fresh_client();
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t0 = Instant::now();
        assert_eq!(http::get(&c, &env.url("/v2/")).await.status, 200);
        worst = worst.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worst < Duration::from_millis(500),
        "a normal request took {worst:?} while slow clients dribbled"
    );

    for s in slow {
        let r = s.await.expect("slowloris task");
        assert_ne!(
            r.end,
            End::Open,
            "a head still unfinished after 6 s was not cut off: {}",
            r.describe()
        );
        assert!(
            r.took >= Duration::from_millis(900) && r.took < 3 * SECOND,
            "closed after {:?}, expected ~1 s (header_timeout)",
            r.took
        );
        assert!(
            r.bytes.is_empty(),
            "a timed-out head gets no response, just a close: {}",
            r.describe()
        );
    }
    assert_healthy(&env, &health, "slowloris").await;
}

/// Connects, sends `first` (maybe nothing), then waits up to `wait` for the
/// server to close. Returns what came back and when the close came.
async fn sit_idle(addr: SocketAddr, first: &'static [u8], wait: Duration) -> Raw {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    if !first.is_empty() {
        s.write_all(first).await.expect("write");
    }
    let (bytes, end) = read_until_closed(&mut s, t0 + wait).await;
    Raw {
        bytes,
        end,
        took: t0.elapsed(),
    }
}

// hyper-util's auto builder reads the first bytes to choose HTTP/1 or
// HTTP/2 with no timeout, and hyper's header_read_timeout only starts once
// HTTP/1 is chosen; wharf bounds that first read itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_header_timeout() {
    let (env, health, _root) = start("header_timeout = \"1s\"").await;
    let addr = env.addr();
    let wait = 4 * SECOND;
    let (silent, one_byte, partial_preface, kept) = tokio::join!(
        sit_idle(addr, b"", wait),
        sit_idle(addr, b"G", wait),
        sit_idle(addr, b"PRI * HT", wait),
        // One whole request on a kept-alive connection, then nothing.
        sit_idle(addr, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", wait),
    );
    assert_eq!(kept.status(), Some(200), "{}", kept.describe());
    let mut open = Vec::new();
    for (what, r) in [
        ("sent nothing", &silent),
        ("sent one byte of a request line", &one_byte),
        ("sent 8 bytes of the HTTP/2 preface", &partial_preface),
        ("was kept alive after a response", &kept),
    ] {
        eprintln!("idle connection that {what}: {}", r.describe());
        if what != "was kept alive after a response" {
            assert!(
                r.bytes.is_empty(),
                "no response to no request: {}",
                r.describe()
            );
        }
        if r.end == End::Open {
            open.push(what);
        } else {
            assert!(
                r.took >= Duration::from_millis(900) && r.took < 3 * SECOND,
                "idle connection that {what} closed after {:?}, expected ~1 s",
                r.took
            );
        }
    }
    assert!(
        open.is_empty(),
        "with header_timeout = 1s these idle connections were still open after {wait:?}: {open:?}"
    );
    assert_healthy(&env, &health, "idle connections").await;
}

// wharf also speaks HTTP/2 with prior knowledge on the same port; an HTTP/2
// connection with no request in flight for header_timeout is closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let (env, health, _root) = start("header_timeout = \"1s\"").await;
    // The client preface and an empty SETTINGS frame, then nothing.
    let r = sit_idle(
        env.addr(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        5 * SECOND,
    )
    .await;
    eprintln!("idle HTTP/2 connection: {}", r.describe());
    assert!(
        r.bytes.len() >= 9 && r.bytes[3] == 0x04,
        "wharf speaks HTTP/2 here (its SETTINGS frame first): {}",
        r.describe()
    );
    assert_ne!(
        r.end,
        End::Open,
        "an HTTP/2 connection without a single request was still open after {:?} (header_timeout = 1s)",
        r.took
    );
    assert!(r.took < 4 * SECOND, "closed after {:?}", r.took);
    assert_healthy(&env, &health, "an idle HTTP/2 connection").await;
}

/// Opens one connection that sends `first`, then shuts wharf down (grace
/// 2 s). Returns how long shutdown took (capped at 20 s) and whether the
/// connection was closed by then.
async fn shutdown_with(first: &'static [u8]) -> (Duration, End) {
    // header_timeout far away: only shutdown itself can close the connection.
    let (mut env, _health, _root) =
        start_with("shutdown_grace = \"2s\"", "header_timeout = \"20s\"").await;
    let mut s = TcpStream::connect(env.addr()).await.expect("connect");
    s.write_all(first).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let server = env.server.take().expect("running");
    let t0 = Instant::now();
    let _ = tokio::time::timeout(20 * SECOND, server.shutdown()).await;
    let took = t0.elapsed();
    let (_, end) = read_until_closed(&mut s, Instant::now() + SECOND).await;
    (took, end)
}

// hyper's graceful shutdown does not close an HTTP/1 connection mid-head,
// and for HTTP/2 waits for the client to acknowledge a PING after GOAWAY,
// which a hostile client never does: wharf drops connections with no
// request in flight as soon as shutdown starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_delay_shutdown() {
    let cases: [(&str, &'static [u8]); 5] = [
        ("silent", b""),
        ("half a request head", b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"),
        ("partial HTTP/2 preface", b"PRI * HT"),
        (
            "kept alive after a response",
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "idle HTTP/2",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ),
    ];
    let results =
        futures_util::future::join_all(cases.iter().map(|(_, first)| shutdown_with(first))).await;
    let mut slow = Vec::new();
    for ((what, _), (took, end)) in cases.iter().zip(results) {
        eprintln!(
            "shutdown with one {what} connection open: {took:?}, then the connection was {end:?}"
        );
        if took >= Duration::from_millis(1500) || end == End::Open {
            slow.push(format!(
                "{what}: shutdown took {took:?}, connection then {end:?}"
            ));
        }
    }
    assert!(
        slow.is_empty(),
        "shutdown (grace 2 s) waited for, or left open, connections with no request in flight: {slow:?}"
    );
}

// ---------------------------------------------------------------------------
// 6. Connection limit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_unanswered() {
    let (env, health, _root) = start("max_connections = 4\nheader_timeout = \"30s\"").await;
    let addr = env.addr();

    // Four connections in the middle of a request head hold every slot.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert!(
            still_open(&mut s, Duration::from_millis(300)).await,
            "held connection {i} was closed: it should have been within the limit"
        );
        held.push(s);
    }

    // A fifth is accepted and closed at once, without a response.
    for attempt in 0..3 {
        let r = exchange(
            addr,
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            3 * SECOND,
        )
        .await;
        assert!(
            r.bytes.is_empty() && r.end != End::Open,
            "connection #{} beyond the limit (attempt {attempt}): {}",
            5 + attempt,
            r.describe()
        );
        assert!(r.took < SECOND, "closed at once, not after {:?}", r.took);
    }
    assert!(
        fresh_client().get(env.url("/v2/")).send().await.is_err(),
        "reqwest gets no response while the server is full"
    );
    // The admin listener has its own budget.
    assert!(rejected(&env, "connection_limit").await >= 4.0);
    // Held connections are unharmed: finish one request on one of them.
    let mut first = held.remove(0);
    first
        .write_all(b"Connection: close\r\n\r\n")
        .await
        .expect("write");
    let (bytes, end) = read_until_closed(&mut first, Instant::now() + 5 * SECOND).await;
    let finished = Raw {
        bytes,
        end,
        took: Duration::ZERO,
    };
    assert_eq!(finished.status(), Some(200), "{}", finished.describe());
    drop(first);

    // Its slot is free again: a new connection is served.
    let t0 = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let r = raw_get(addr, "/v2/", &[]).await;
        if r.status() == Some(200) {
            break;
        }
        assert!(
            t0.elapsed() < 2 * SECOND,
            "no slot came free within 2 s of a connection closing: {}",
            r.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("a freed slot served a new connection after {attempts} attempt(s)");
    drop(held);
    // Closed connections give their slots back, so a whole pull works.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_healthy(&env, &health, "a connection flood").await;
}

/// Holds `n` connections that sent `first` (maybe nothing) and, after
/// `after`, tries for up to 2 s to get `GET /v2/` answered on a new one.
/// Returns how long that took, or the last failed attempt.
async fn served_despite_held(
    addr: SocketAddr,
    n: usize,
    first: &[u8],
    after: Duration,
) -> Result<Duration, Raw> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        if !first.is_empty() {
            s.write_all(first).await.expect("write");
        }
        held.push(s);
    }
    tokio::time::sleep(after).await;
    let t0 = Instant::now();
    loop {
        let r = raw_get(addr, "/v2/", &[]).await;
        if r.status() == Some(200) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > 2 * SECOND {
            return Err(r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// With max_connections = 4, four connections that never send a byte must
// not keep every slot: anyone who can open max_connections sockets would
// shut every client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_hold_connection_slots_forever() {
    let (env, health, _root) = start("max_connections = 4\nheader_timeout = \"1s\"").await;
    let addr = env.addr();
    // Control: four connections that each sent one byte are cut at ~1 s.
    let waited = served_despite_held(addr, 4, b"G", 2 * SECOND)
        .await
        .unwrap_or_else(|r| {
            panic!(
                "one-byte connections still held every slot 4 s later: {}",
                r.describe()
            )
        });
    eprintln!("after four one-byte connections: served (waited {waited:?} more)");
    // Four connections that send nothing at all.
    let silent = served_despite_held(addr, 4, b"", 2 * SECOND).await;
    if let Err(r) = &silent {
        eprintln!(
            "after four silent connections: still refused 4 s later: {}",
            r.describe()
        );
    }
    assert!(
        silent.is_ok(),
        "four silent connections held every slot for 4 s with header_timeout = 1s"
    );
    assert_healthy(&env, &health, "silent connections").await;
}

// ---------------------------------------------------------------------------
// 7. Per-client request limit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_request_limit_gets_429_and_others_are_served() {
    let (env, health, _root) = start("client_requests = 2").await;
    let cached_data = pseudo_random_bytes(8, 50_000);
    let cached = env.fake.add_blob("library/app", cached_data.clone());
    assert_eq!(
        http::get(&env.c, &env.blob_url("library/app", &cached))
            .await
            .bytes(),
        cached_data
    );
    env.wait_committed(&cached, &cached_data, 5 * SECOND)
        .await
        .expect("cached");

    // A cold blob that trickles in over ~4 s.
    let slow_data = pseudo_random_bytes(9, 200_000);
    let slow = env.fake.add_blob("library/app", slow_data.clone());
    env.fake.throttle(&slow, 8192, Duration::from_millis(160));
    let c = fresh_client();
    let url = env.blob_url("library/app", &slow);
    let t0 = Instant::now();
    let r1 = c.get(&url).send().await.expect("first slow download");
    let r2 = c.get(&url).send().await.expect("second slow download");
    assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (200, 200));

    // A third request from the same address: refused, whatever it asks.
    for path in [
        "/v2/".to_string(),
        format!("/v2/library/app/blobs/{cached}"),
    ] {
        let r = http::get(&c, &env.url(&path)).await;
        assert_eq!(r.status, 429, "third request {path} from 127.0.0.1");
        assert_eq!(r.error_code().as_deref(), Some("TOOMANYREQUESTS"));
        assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    }
    // Another address is not held back.
    let other = client_from("127.0.0.2");
    assert_eq!(http::get(&other, &env.url("/v2/")).await.status, 200);
    let b = http::get(&other, &env.blob_url("library/app", &cached)).await;
    assert_eq!(b.status, 200, "127.0.0.2 gets a cached blob");
    assert_eq!(b.bytes(), cached_data);
    let checks_took = t0.elapsed();
    assert!(
        checks_took < 3 * SECOND,
        "the checks took {checks_took:?}: the slow downloads may have finished meanwhile"
    );

    // The slow downloads finish with the right bytes.
    let (b1, b2) = tokio::join!(r1.bytes(), r2.bytes());
    assert_eq!(digest_of(&b1.expect("body 1")), slow);
    assert_eq!(digest_of(&b2.expect("body 2")), slow);
    assert_eq!(env.fake.blob_gets(&slow), 1, "one fill for both");

    // And the first address is welcome again.
    let t1 = Instant::now();
    let mut refused = 0;
    loop {
        let r = http::get(&c, &env.url("/v2/")).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 429);
        refused += 1;
        assert!(
            t1.elapsed() < SECOND,
            "127.0.0.1 still refused 1 s after its downloads finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("after the downloads finished: {refused} more 429(s) before a 200");
    assert!(rejected(&env, "client_limit").await >= 2.0);
    env.fake.clear_throttle(&slow);
    assert_healthy(&env, &health, "a client over its limit").await;
}

// ---------------------------------------------------------------------------
// 8. Fill limit
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_beyond_max_fills_get_429_while_hits_and_joins_are_served() {
    let (env, health, _root) = start("max_fills = 1").await;
    let repo = "library/app";
    let c_data = pseudo_random_bytes(10, 60_000);
    let cached = env.fake.add_blob(repo, c_data.clone());
    assert_eq!(
        http::get(&env.c, &env.blob_url(repo, &cached))
            .await
            .bytes(),
        c_data
    );
    env.wait_committed(&cached, &c_data, 5 * SECOND)
        .await
        .expect("cached");
    // The fill is over once committed and indexed; give it a moment to leave.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let a_data = pseudo_random_bytes(11, 200_000);
    let a = env.fake.add_blob(repo, a_data.clone());
    env.fake.throttle(&a, 8192, Duration::from_millis(160));
    let b_data = pseudo_random_bytes(12, 30_000);
    let b = env.fake.add_blob(repo, b_data.clone());

    let c = fresh_client();
    let t0 = Instant::now();
    let r1 = c
        .get(env.blob_url(repo, &a))
        .send()
        .await
        .expect("fill of A");
    assert_eq!(r1.status().as_u16(), 200);

    // B would be a second fill: refused, upstream untouched.
    let rb = http::get(&c, &env.blob_url(repo, &b)).await;
    assert_eq!(rb.status, 429, "a miss beyond max_fills: {:?}", rb.body);
    assert_eq!(rb.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    assert_eq!(rb.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        env.fake.blob_gets(&b),
        0,
        "a refused fill never asks upstream"
    );
    // HEAD is no fill.
    let hb = http::head(&c, &env.blob_url(repo, &b)).await;
    assert_eq!(hb.status, 200, "HEAD of B while fills are full");
    assert_eq!(hb.header("content-length"), Some(b_data.len().to_string()));
    // A hit is served.
    let hit = http::get(&c, &env.blob_url(repo, &cached)).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.bytes(), c_data);
    assert!(
        t0.elapsed() < 3 * SECOND,
        "the checks took {:?}: A may have finished meanwhile",
        t0.elapsed()
    );
    // A second client of A joins the fill in flight.
    let joined = http::get(&fresh_client(), &env.blob_url(repo, &a)).await;
    assert_eq!(joined.status, 200);
    assert_eq!(digest_of(&joined.bytes()), a, "the joining client's bytes");
    let first = r1.bytes().await.expect("body of A");
    assert_eq!(digest_of(&first), a, "the first client's bytes");
    assert_eq!(env.fake.blob_gets(&a), 1, "one upstream GET for A");
    env.wait_committed(&a, &a_data, 5 * SECOND)
        .await
        .expect("A committed");

    // With A done, B may fill.
    let t1 = Instant::now();
    let mut refused = 0;
    let rb = loop {
        let rb = http::get(&c, &env.blob_url(repo, &b)).await;
        if rb.status != 429 {
            break rb;
        }
        refused += 1;
        assert!(
            t1.elapsed() < 2 * SECOND,
            "B still refused 2 s after A's fill completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("after A completed: {refused} more 429(s) for B before an answer");
    assert_eq!(rb.status, 200, "B after A: {:?}", rb.body);
    assert_eq!(digest_of(&rb.bytes()), b);
    assert_eq!(env.fake.blob_gets(&b), 1);
    assert_eq!(env.fake.blob_gets(&a), 1);
    assert!(rejected(&env, "fill_limit").await >= 1.0);
    env.fake.clear_throttle(&a);
    assert_healthy(&env, &health, "a fill storm").await;
}

// ---------------------------------------------------------------------------
// 9. Upstream sends more than it declares
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_body_longer_than_its_content_length_is_never_committed() {
    let (env, health, _root) = start("").await;
    for (seed, by) in [(20u64, 1usize), (21, 4096)] {
        let data = pseudo_random_bytes(seed, 400_000);
        let d = env.fake.add_blob("library/app", data.clone());
        env.fake.fault(&d, Fault::UnderstatedLength { by });
        let url = env.blob_url("library/app", &d);

        let r = http::send(env.c.get(&url)).await;
        let seen = match &r {
            Ok(o) => format!(
                "status {} content-length {:?} body {}",
                o.status,
                o.header("content-length"),
                match &o.body {
                    Ok(b) => format!("complete, {} bytes, {}", b.len(), digest_of(b)),
                    Err(e) => format!("cut short: {e}"),
                }
            ),
            Err(e) => format!("no response: {e:?}"),
        };
        eprintln!("[by {by}] client saw {seen}");
        // Whatever happens, never a complete 2xx body (let alone one that
        // hashes to the digest).
        if let Ok(o) = &r {
            assert!(
                !o.looks_complete_ok(),
                "[by {by}] the client got a complete 2xx answer: {seen}"
            );
            if let Ok(body) = &o.body {
                assert_ne!(digest_of(body), d, "[by {by}] {seen}");
            }
        }
        // Precisely: wharf streams as it fills, so the client has a 200 with
        // upstream's (short) length, and the body is cut before its end
        // because the last bytes wait for the digest check, which fails.
        let o = r.as_ref().unwrap_or_else(|_| panic!("[by {by}] {seen}"));
        assert_eq!(o.status, 200, "[by {by}] {seen}");
        assert_eq!(
            o.header("content-length"),
            Some((data.len() - by).to_string()),
            "[by {by}] {seen}"
        );
        assert!(o.body.is_err(), "[by {by}] body cut: {seen}");
        assert!(
            env.fake.blob_gets(&d) >= 1,
            "[by {by}] wharf asked upstream"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !env.blob_path(&d).exists(),
            "[by {by}] a body that did not match its digest was committed"
        );
        env.wait_tmp_empty(3 * SECOND)
            .await
            .unwrap_or_else(|left| panic!("[by {by}] temp files left: {left:?}"));

        env.fake.clear_fault(&d);
        let before = env.fake.blob_gets(&d);
        let good = http::get(&env.c, &url).await;
        assert_eq!(
            good.status, 200,
            "[by {by}] after the fault: {:?}",
            good.body
        );
        assert_eq!(digest_of(&good.bytes()), d, "[by {by}] right bytes");
        assert!(
            env.fake.blob_gets(&d) > before,
            "[by {by}] a new upstream GET"
        );
        env.wait_committed(&d, &data, 3 * SECOND)
            .await
            .unwrap_or_else(|e| panic!("[by {by}] good fill not committed: {e}"));
    }
    assert_healthy(&env, &health, "an overlong upstream body").await;
}
