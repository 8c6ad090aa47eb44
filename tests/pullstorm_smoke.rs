//! CI smoke test of the pullstorm harness (`benches/pullstorm.rs`, included
//! here as a module): a real `docker-registry` upstream seeded by the
//! harness, wharf in-process in front of it, short storms (plain image and
//! multi-arch index, `?ns=`, Range chunks, straight at the upstream), then
//! a byte flipped in a cached blob and a missing tag, which the harness must
//! report as errors. Correctness only: no timing assertions.

#[path = "../benches/pullstorm.rs"]
mod pullstorm;

use clap::Parser;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pullstorm::{Opts, Report, Seeded};

struct Registry {
    child: Child,
    addr: String,
    access_log: PathBuf,
    log: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Upstream GETs of a blob, from the access log.
    fn blob_gets(&self, digest: &str) -> usize {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    }
}

fn find_registry() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("docker-registry"))
        .chain([PathBuf::from("/usr/bin/docker-registry")])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("docker-registry not found: apt-get install docker-registry (tests/run.sh does)")
    })
}

fn start_registry(dir: &Path) -> Registry {
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {}
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:0
  secret: pullstorm-smoke
health:
  storagedriver:
    enabled: false
",
            dir.join("registry-data").display()
        ),
    )
    .expect("write registry config");
    let access_log = dir.join("registry.access.log");
    let log = dir.join("registry.log");
    let mut cmd = Command::new(find_registry());
    cmd.arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&access_log).expect("access log"))
        .stderr(std::fs::File::create(&log).expect("log"));
    // SAFETY: prctl is async-signal-safe; the registry dies with this test process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn docker-registry");
    let mut registry = Registry {
        child,
        addr: String::new(),
        access_log,
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&registry.log) {
            let _ = f.read_to_string(&mut text);
        }
        if let Some(i) = text.find("listening on 127.0.0.1:") {
            let rest = &text[i + "listening on ".len()..];
            let end = rest
                .find(|c: char| c != '.' && c != ':' && !c.is_ascii_digit())
                .unwrap_or(rest.len());
            registry.addr = rest[..end].to_string();
            return registry;
        }
        if let Ok(Some(status)) = registry.child.try_wait() {
            panic!("docker-registry exited with {status}:\n{}", registry.tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "docker-registry did not report its address:\n{}",
        registry.tail()
    );
}

fn opts(args: &[&str]) -> Opts {
    let mut all = vec![
        "pullstorm",
        "--quiet",
        "--grace",
        "60s",
        "--request-timeout",
        "20s",
    ];
    all.extend_from_slice(args);
    Opts::try_parse_from(all).expect("harness options")
}

async fn storm(args: &[&str]) -> Report {
    let report = pullstorm::pull_storm(&opts(args))
        .await
        .expect("harness runs");
    eprintln!("{}", report.table());
    report
}

fn assert_clean(report: &Report, pulls: u64) {
    assert!(
        report.errors.is_empty(),
        "errors: {:?}",
        report.first_errors
    );
    assert_eq!(report.pulls_ok, pulls, "pulls ok");
    assert_eq!(report.pulls_failed, 0);
    assert!(!report.aborted);
    assert_eq!(report.pull.count as u64, pulls);
}

fn blob_path(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    data.join("blobs").join("sha256").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_pulls_verifies_and_reports_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = start_registry(dir.path());
    let up = registry.url();

    // Seed through the harness: a plain image and a two-platform index.
    let seeded: Vec<Seeded> = {
        let mut all = pullstorm::seed(&opts(&[
            "--registry",
            &up,
            "--image",
            "smoke/plain:1",
            "--seed-layers",
            "2",
            "--seed-layer-size",
            "300KiB",
        ]))
        .await
        .expect("seed plain");
        all.extend(
            pullstorm::seed(&opts(&[
                "--registry",
                &up,
                "--image",
                "smoke/multi:1",
                "--seed-layers",
                "2",
                "--seed-layer-size",
                "200KiB",
                "--seed-index",
            ]))
            .await
            .expect("seed index"),
        );
        all
    };
    assert_eq!(seeded.len(), 2);

    let data = dir.path().join("wharf-data");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[storage]\ndir = \"{}\"\n\
         [cache]\ntag_ttl = \"5m\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{up}\"\ndefault = true\n",
        data.display()
    );
    let config = wharf::config::Config::from_toml_str(&config).expect("wharf config");
    let server = tokio::time::timeout(Duration::from_secs(10), wharf::start(config))
        .await
        .expect("wharf starts in time")
        .expect("wharf starts");
    let wharf_url = format!("http://{}", server.local_addr());

    // 6 nodes × 2 images × 2 rounds through wharf, containerd-style (?ns=).
    let r = storm(&[
        "--registry",
        &wharf_url,
        "--ns",
        "docker.io",
        "--image",
        "smoke/plain:1",
        "--image",
        "smoke/multi:1",
        "--nodes",
        "6",
        "--rounds",
        "2",
    ])
    .await;
    assert_clean(&r, 24);
    let per_round: u64 = seeded
        .iter()
        .map(|s| s.config.size + s.layers.iter().map(|l| l.size).sum::<u64>())
        .sum();
    assert!(
        r.bytes >= 12 * per_round,
        "{} bytes < {}",
        r.bytes,
        12 * per_round
    );
    assert!(r.ttfb_blob.count >= 12 * 3 * 2);

    // Every amd64 blob went upstream once; the arm64 child was never fetched.
    for s in &seeded {
        for d in std::iter::once(&s.config).chain(&s.layers) {
            assert_eq!(
                registry.blob_gets(&d.digest),
                1,
                "upstream GETs of {}",
                d.digest
            );
        }
    }
    let arm_layers = std::fs::read_to_string(&registry.access_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v2/smoke/multi/blobs/"))
        .count();
    assert_eq!(
        arm_layers, 3,
        "only the amd64 config and 2 layers of smoke/multi"
    );

    // Range-chunked layer fetches, two chunks in flight, no ns.
    let r = storm(&[
        "--registry",
        &wharf_url,
        "--image",
        "smoke/plain:1",
        "--image",
        "smoke/multi:1",
        "--nodes",
        "3",
        "--range-chunk",
        "64KiB",
        "--range-parallel",
        "2",
    ])
    .await;
    assert_clean(&r, 6);
    assert!(r.ttfb_blob.count >= 6 * 4, "chunks were requested");

    // Straight at the upstream registry, by digest too.
    let by_digest = format!("smoke/plain@{}", seeded[0].digest);
    let r = storm(&[
        "--registry",
        &up,
        "--image",
        &by_digest,
        "--image",
        "smoke/multi:1",
        "--nodes",
        "2",
        "--range-chunk",
        "100KiB",
    ])
    .await;
    assert_clean(&r, 4);

    // A corrupt cached blob: same length, one byte flipped. The harness must catch it.
    let victim = blob_path(&data, &seeded[0].layers[0].digest);
    let mut bytes = std::fs::read(&victim).expect("cached blob on disk");
    bytes[1000] ^= 0xff;
    std::fs::write(&victim, &bytes).expect("corrupt the cached blob");
    let r = storm(&[
        "--registry",
        &wharf_url,
        "--image",
        "smoke/plain:1",
        "--image",
        "smoke/nope:1",
        "--nodes",
        "2",
    ])
    .await;
    assert_eq!(r.pulls_ok, 0, "no pull may succeed: {:?}", r.first_errors);
    assert_eq!(r.pulls_failed, 4);
    assert_eq!(r.errors.get("digest_mismatch"), Some(&2), "{:?}", r.errors);
    assert_eq!(r.errors.get("http_404"), Some(&2), "{:?}", r.errors);
    assert!(r.error_count() == 4);

    server.shutdown().await;
}
