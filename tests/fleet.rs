//! Replicas sharing one S3-compatible bucket: a blob fetched from upstream
//! by one replica is read from the bucket by the others; with the fetch
//! lease on, a cold blob is fetched once per fleet; a replica killed
//! mid-upload leaves no final object. The bucket is a real moto server
//! (`pip install 'moto[server]'`), started per test; the upstream is the
//! counting fake.

mod common;
mod harness;

use common::fake_upstream::{pseudo_random_bytes, FakeUpstream, Options};
use common::http;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "wharf-fleet";

/// A moto S3 server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_moto() -> Moto {
    // Signed requests need some credentials; moto accepts any.
    std::env::set_var("AWS_ACCESS_KEY_ID", "fleet-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "fleet-test");
    let port = free_port();
    // As a module, so no PATH or pyenv shim is needed for its script.
    let child = Command::new("python3")
        .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start `python3 -m moto.server` ({e}): install it with `python3 -m pip install 'moto[server]'` (tests/run.sh does)")
        });
    let url = format!("http://127.0.0.1:{port}");
    let moto = Moto { child, url };
    let c = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(resp) = c.put(format!("{}/{BUCKET}", moto.url)).send().await {
            assert!(
                resp.status().is_success(),
                "create bucket: {}",
                resp.status()
            );
            return moto;
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not start within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn replica_config(dir: &std::path::Path, moto: &str, upstream: &str, lease: bool) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [storage]\ndir = \"{}\"\nbackend = \"s3\"\nbucket = \"{BUCKET}\"\nprefix = \"cache/\"\n\
         endpoint = \"{moto}\"\nlease = {lease}\nlease_ttl = \"30s\"\n\
         [cache]\ntag_ttl = \"5m\"\n\
         [[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\ndefault = true\n",
        dir.display()
    )
}

struct Replica {
    server: wharf::RunningServer,
    dir: tempfile::TempDir,
}

impl Replica {
    async fn start(moto: &Moto, upstream: &FakeUpstream, lease: bool) -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let text = replica_config(dir.path(), &moto.url, &upstream.url(), lease);
        let config = wharf::config::Config::from_toml_str(&text).expect("config");
        let server = wharf::start(config).await.expect("start replica");
        Replica { server, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.local_addr())
    }
}

/// The size of the object under the blob's final key, if there is one.
async fn bucket_object(moto: &Moto, digest: &str) -> Option<usize> {
    let config = wharf::config::S3Config {
        bucket: BUCKET.into(),
        prefix: "cache/".into(),
        endpoint: Some(moto.url.parse().unwrap()),
        region: "us-east-1".into(),
        lease: false,
        lease_ttl: Duration::from_secs(30),
    };
    let bucket = wharf::fleet::Fleet::new(&config).expect("bucket client");
    bucket
        .size(&digest.parse().unwrap())
        .await
        .expect("bucket HEAD")
        .map(|n| n as usize)
}

async fn wait_in_bucket(moto: &Moto, digest: &str, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bucket_object(moto, digest).await != Some(len) {
        assert!(
            Instant::now() < deadline,
            "{digest} not in the bucket within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_reads_blobs_from_the_bucket_not_upstream() {
    let moto = start_moto().await;
    let fake = FakeUpstream::start(Options::default()).await;
    let layers = [
        pseudo_random_bytes(1, 6 << 20),
        pseudo_random_bytes(2, 3000),
    ];
    let img = fake.add_image("team/app", Some("v1"), &layers);
    let a = Replica::start(&moto, &fake, false).await;
    let b = Replica::start(&moto, &fake, false).await;
    let c = http::client();

    for replica in [&a, &b] {
        let m = http::get(&c, &replica.url("/v2/team/app/manifests/v1")).await;
        assert_eq!(m.status, 200);
        for (digest, bytes) in &img.layers {
            let blob = http::get(&c, &replica.url(&format!("/v2/team/app/blobs/{digest}"))).await;
            assert_eq!(blob.status, 200);
            assert_eq!(&blob.bytes(), bytes, "{digest}");
            if std::ptr::eq(replica, &a) {
                wait_in_bucket(&moto, digest, bytes.len()).await;
            }
        }
    }
    for (digest, _) in &img.layers {
        assert_eq!(fake.blob_gets(digest), 1, "B read {digest} from the bucket");
    }
    let metrics = reqwest::get(format!("http://{}/metrics", b.server.admin_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("wharf_fills_total{source=\"bucket\"} 2"),
        "{metrics}"
    );

    // A range of a blob only the bucket has is read straight from it.
    let only_in_bucket = pseudo_random_bytes(5, 2 << 20);
    let digest = fake.add_blob("team/app", only_in_bucket.clone());
    let warm = http::get(&c, &a.url(&format!("/v2/team/app/blobs/{digest}"))).await;
    assert_eq!(warm.bytes().len(), only_in_bucket.len());
    wait_in_bucket(&moto, &digest, only_in_bucket.len()).await;
    let c_replica = Replica::start(&moto, &fake, false).await;
    let link = http::get(&c, &c_replica.url("/v2/team/app/manifests/v1")).await;
    assert_eq!(link.status, 200);
    let before = fake.total_requests();
    let part = http::get_range(
        &c,
        &c_replica.url(&format!("/v2/team/app/blobs/{digest}")),
        "bytes=1000-1999",
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range").as_deref(),
        Some(format!("bytes 1000-1999/{}", only_in_bucket.len()).as_str())
    );
    assert_eq!(&part.bytes()[..], &only_in_bucket[1000..2000]);
    assert_eq!(
        fake.blob_gets(&digest),
        1,
        "the range came from the bucket, not upstream"
    );
    assert!(
        fake.total_requests() - before <= 1,
        "at most one upstream HEAD"
    );
    assert!(
        !harness::blob_path(c_replica.dir.path(), &digest).exists(),
        "a range is passed through, not cached locally"
    );
    c_replica.server.shutdown().await;

    // The bucket does not bypass the cross-repository check.
    let probe = http::get(
        &c,
        &b.url(&format!("/v2/other/app/blobs/{}", img.layers[0].0)),
    )
    .await;
    assert_eq!(probe.status, 404);
    a.server.shutdown().await;
    b.server.shutdown().await;
}

/// `replicas` replicas, `clients` concurrent pulls of one cold, slow blob
/// spread over them. Returns upstream GETs for the blob and the wall time.
async fn cold_storm(replicas: usize, lease: bool, clients: usize) -> (usize, Duration) {
    let moto = start_moto().await;
    let fake = FakeUpstream::start(Options::default()).await;
    let bytes = pseudo_random_bytes(3, 4 << 20);
    let digest = fake.add_blob("team/app", bytes.clone());
    // ~1 s per fetch, so the pulls overlap.
    fake.throttle(&digest, 256 << 10, Duration::from_millis(60));
    let mut fleet = Vec::new();
    for _ in 0..replicas {
        fleet.push(Replica::start(&moto, &fake, lease).await);
    }
    let c = http::client();
    let started = Instant::now();
    let pulls: Vec<_> = (0..clients)
        .map(|i| {
            let url = fleet[i % replicas].url(&format!("/v2/team/app/blobs/{digest}"));
            let c = c.clone();
            tokio::spawn(async move { http::get(&c, &url).await })
        })
        .collect();
    for pull in pulls {
        let got = pull.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.bytes().len(), bytes.len());
        assert_eq!(format!("sha256:{}", http::sha256_hex(&got.bytes())), digest);
    }
    let wall = started.elapsed();
    for replica in fleet {
        replica.server.shutdown().await;
    }
    (fake.blob_gets(&digest), wall)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_fetch_at_most_once_per_replica() {
    let (gets, _) = cold_storm(2, false, 8).await;
    assert!(
        (1..=2).contains(&gets),
        "{gets} upstream GETs for 2 replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_lease_a_cold_blob_is_fetched_once_per_fleet() {
    let (gets, _) = cold_storm(3, true, 9).await;
    assert_eq!(gets, 1, "one upstream GET for the whole fleet");
}

/// The numbers in the README: `cargo test --release --test fleet -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_fleet_upstream_traffic() {
    println!("replicas lease upstream_gets wall_ms");
    for replicas in 2..=4 {
        for lease in [false, true] {
            let (gets, wall) = cold_storm(replicas, lease, replicas * 4).await;
            println!("{replicas} {lease} {gets} {}", wall.as_millis());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_leaves_no_final_object() {
    let moto = start_moto().await;
    let fake = FakeUpstream::start(Options::default()).await;
    let bytes = pseudo_random_bytes(4, 24 << 20);
    let digest = fake.add_blob("team/app", bytes.clone());
    // The replica reaches the bucket through a slow relay, so its upload
    // is still running when it is killed.
    let relay = slow_relay(&moto.url, 2 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(
        &config,
        replica_config(&dir.path().join("data"), &relay, &fake.url(), false),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::listening_addr(&mut child);
    let c = http::client();
    let blob = http::get(&c, &format!("http://{addr}/v2/team/app/blobs/{digest}")).await;
    assert_eq!(blob.bytes().len(), bytes.len());
    // The fill is committed; the upload (24 MiB at 2 MiB/s) is under way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        bucket_object(&moto, &digest).await,
        None,
        "an unfinished upload must not be visible"
    );

    // Another replica pulls it cleanly, and shares it.
    let replica = Replica::start(&moto, &fake, false).await;
    let again = http::get(&c, &replica.url(&format!("/v2/team/app/blobs/{digest}"))).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.bytes(), bytes);
    wait_in_bucket(&moto, &digest, bytes.len()).await;
    replica.server.shutdown().await;
}

/// A TCP relay to `target` that forwards client bytes at `rate` bytes/s.
async fn slow_relay(target: &str, rate: usize) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = target.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let chunk = (rate / 10).max(1);
                let upload = async move {
                    let mut buf = vec![0u8; chunk];
                    loop {
                        match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if server_write.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                };
                let download = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::join!(upload, download);
            });
        }
    });
    format!("http://{addr}")
}
