//! Operations: Prometheus metrics over a cold and a warm pull, health and
//! readiness through an upstream outage, request ids, JSON logs, and
//! SIGTERM with a download in flight.

mod common;
mod harness;

use std::collections::HashMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::{self, sha256_hex};
use harness::*;

/// Parses the Prometheus/OpenMetrics text format strictly enough to catch a
/// malformed exposition: every line is a comment we know, or
/// `name{labels} value`. Returns samples keyed by `name{labels}`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    assert!(text.ends_with("# EOF\n"), "no # EOF terminator");
    for line in text.lines() {
        if line == "# EOF" {
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "unknown comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line:?}");
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

fn sum_matching(samples: &HashMap<String, f64>, prefix: &str, must_contain: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && must_contain.iter().all(|c| k.contains(c)))
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(c: &reqwest::Client, admin: std::net::SocketAddr) -> HashMap<String, f64> {
    let out = http::get(c, &format!("http://{admin}/metrics")).await;
    assert_eq!(out.status, 200);
    parse_metrics(std::str::from_utf8(&out.bytes()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_cold_then_a_warm_pull() {
    let env = Env::default().await;
    let admin = env.server.as_ref().unwrap().admin_addr();
    let img = env.fake.add_image(
        "library/app",
        Some("v1"),
        &[
            pseudo_random_bytes(1, 300_000),
            pseudo_random_bytes(2, 50_000),
        ],
    );
    let blob_bytes =
        (img.layers.iter().map(|(_, b)| b.len()).sum::<usize>() + img.config.len()) as f64;
    let before = scrape(&env.c, admin).await;
    assert_eq!(
        sum_matching(&before, "wharf_cache_requests_total", &[]),
        0.0
    );

    env.pull("library/app", "v1", &img).await;
    let cold = scrape(&env.c, admin).await;
    let up = "upstream=\"docker.io\"";
    assert_eq!(
        sum_matching(
            &cold,
            "wharf_cache_requests_total",
            &[up, "kind=\"blob\"", "result=\"miss\""]
        ),
        3.0
    );
    assert_eq!(
        sum_matching(
            &cold,
            "wharf_cache_requests_total",
            &[up, "kind=\"manifest\"", "result=\"miss\""]
        ),
        1.0
    );
    assert_eq!(
        sum_matching(&cold, "wharf_served_bytes_total", &[up, "source=\"fill\""]),
        blob_bytes
    );
    assert!(sum_matching(&cold, "wharf_upstream_fetched_bytes_total", &[up]) >= blob_bytes);
    assert_eq!(
        sum_matching(
            &cold,
            "wharf_requests_total",
            &["endpoint=\"blob\"", "status=\"200\""]
        ),
        3.0
    );
    assert!(
        sum_matching(
            &cold,
            "wharf_upstream_request_duration_seconds_count",
            &[up]
        ) >= 4.0
    );
    assert_eq!(cold["wharf_cache_blobs"], 3.0);
    assert_eq!(cold["wharf_cache_size_bytes"], blob_bytes);
    assert_eq!(cold["wharf_fills_in_flight"], 0.0);
    assert_eq!(cold["wharf_fill_clients"], 0.0);

    env.pull("library/app", "v1", &img).await;
    let warm = scrape(&env.c, admin).await;
    assert_eq!(
        sum_matching(
            &warm,
            "wharf_cache_requests_total",
            &[up, "kind=\"blob\"", "result=\"hit\""]
        ),
        3.0
    );
    assert_eq!(
        sum_matching(
            &warm,
            "wharf_cache_requests_total",
            &[up, "kind=\"manifest\"", "result=\"hit\""]
        ),
        1.0
    );
    assert_eq!(
        sum_matching(&warm, "wharf_served_bytes_total", &[up, "source=\"cache\""]),
        blob_bytes
    );
    assert_eq!(
        sum_matching(&warm, "wharf_upstream_fetched_bytes_total", &[up]),
        sum_matching(&cold, "wharf_upstream_fetched_bytes_total", &[up]),
        "a warm pull fetches nothing"
    );

    // Upstream errors are counted by kind.
    let missing = http::get(&env.c, &env.manifest_url("library/app", "nope")).await;
    assert_eq!(missing.status, 404);
    let after = scrape(&env.c, admin).await;
    assert_eq!(
        sum_matching(
            &after,
            "wharf_upstream_errors_total",
            &[up, "kind=\"not_found\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_survive_an_upstream_outage() {
    let env = Env::default().await;
    let admin = env.server.as_ref().unwrap().admin_addr();
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http::get(&env.c, &format!("http://{admin}{path}"))
                .await
                .status,
            200,
            "{path}"
        );
    }
    env.fake.stop().await;
    let miss = http::get(&env.c, &env.manifest_url("library/gone", "1")).await;
    assert_eq!(miss.status, 502, "the outage is real");
    assert_eq!(
        http::get(&env.c, &format!("http://{admin}/readyz"))
            .await
            .status,
        200
    );
    assert_eq!(
        http::get(&env.c, &format!("http://{admin}/nothing"))
            .await
            .status,
        404
    );

    // Readiness does fail when the data dir stops taking writes.
    let tmp = env.dir.path().join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a dir").unwrap();
    let out = http::get(&env.c, &format!("http://{admin}/readyz")).await;
    assert_eq!(out.status, 503);
    assert!(String::from_utf8_lossy(&out.bytes()).contains("not writable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_echoed_or_made() {
    let env = Env::default().await;
    let given = env
        .c
        .get(env.url("/v2/"))
        .header("X-Request-Id", "node-7-pull-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "node-7-pull-42");
    let a = http::get(&env.c, &env.url("/v2/"))
        .await
        .header("x-request-id")
        .unwrap();
    let b = http::get(&env.c, &env.url("/v2/"))
        .await
        .header("x-request-id")
        .unwrap();
    assert_ne!(a, b);
}

/// SIGTERM while a slow cold download is in flight: the download completes
/// within the grace period, the log is JSON, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_download_finish_and_exits_zero() {
    let fake = FakeUpstream::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = pseudo_random_bytes(5, 4 << 20);
    let digest = fake.add_blob("library/big", bytes.clone());
    fake.throttle(&digest, 128 * 1024, Duration::from_millis(60)); // ~2 s in all

    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--upstream")
        .arg(format!("docker.io={}", fake.url()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = common::listening_addr(&mut child);

    let c = http::client();
    let mut resp = c
        .get(format!("http://{addr}/v2/library/big/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = resp.chunk().await.unwrap().unwrap().to_vec();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(
        sha256_hex(&got),
        sha256_hex(&bytes),
        "the in-flight download completed intact"
    );
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "wharf did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    // Once stopped, new connections are refused.
    assert!(c.get(format!("http://{addr}/v2/")).send().await.is_err());

    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    let request_line = logs
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .find(|v| v["fields"]["message"] == "request")
        .expect("a request log line");
    let fields = &request_line["fields"];
    assert_eq!(fields["name"], "library/big");
    assert_eq!(fields["upstream"], "docker.io");
    assert_eq!(fields["outcome"], "fill");
    assert_eq!(fields["status"], 200);
    assert!(fields["request_id"].is_string());
}

fn run_warm(args: &[String]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("warm")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wharf warm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_through_a_running_wharf_fetches_only_the_chosen_platform() {
    let env = Env::default().await;
    let amd64 = env
        .fake
        .add_image("library/multi", None, &[pseudo_random_bytes(40, 100_000)]);
    let arm64 = env
        .fake
        .add_image("library/multi", None, &[pseudo_random_bytes(41, 100_000)]);
    env.fake.add_index(
        "library/multi",
        Some("1"),
        &[(&amd64, "amd64"), (&arm64, "arm64")],
    );
    let out = run_warm(&[
        "--registry".into(),
        env.base.clone(),
        "--platform".into(),
        "linux/amd64".into(),
        "library/multi:1".into(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("warmed library/multi:1: 2 manifest(s), 2 blob(s)"),
        "{said}"
    );
    assert_eq!(env.fake.blob_gets(&amd64.layers[0].0), 1);
    assert_eq!(
        env.fake.blob_gets(&arm64.layers[0].0),
        0,
        "another platform was fetched"
    );

    let before = env.fake.total_requests();
    env.pull("library/multi", &amd64.manifest_digest, &amd64)
        .await;
    assert_eq!(
        env.fake.total_requests(),
        before,
        "a pull after warm-up must not reach upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_straight_into_a_data_dir() {
    let fake = FakeUpstream::start(Options::default()).await;
    let img = fake.add_image(
        "library/app",
        Some("v2"),
        &[pseudo_random_bytes(50, 200_000)],
    );
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "# rollout of app v2\nlibrary/app:v2\n").unwrap();
    run_warm(&[
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--upstream".into(),
        format!("docker.io={}", fake.url()),
        "--file".into(),
        list.display().to_string(),
    ]);
    let warmed = fake.total_requests();
    assert!(warmed >= 3);

    let server = start_wharf(
        dir.path(),
        "tag_ttl = \"5m\"",
        &upstream_toml("docker.io", &fake.url(), true, ""),
    )
    .await;
    let c = http::client();
    let base = format!("http://{}", server.local_addr());
    let m = http::get(&c, &format!("{base}/v2/library/app/manifests/v2")).await;
    assert_eq!(m.bytes(), img.manifest);
    for (d, bytes) in &img.layers {
        assert_eq!(
            http::get(&c, &format!("{base}/v2/library/app/blobs/{d}"))
                .await
                .bytes(),
            bytes
        );
    }
    assert_eq!(
        fake.total_requests(),
        warmed,
        "the warmed data dir answered everything"
    );
    server.shutdown().await;

    // A bad image reference is a clear error, not a crash.
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["warm", "--registry", "http://127.0.0.1:1", "Not/Valid"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an image reference"));
}
