//! wharf in-process against the fake upstream: caching, single-flight fills,
//! Range, HEAD, validation, routing, tags, restart.

mod common;
mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::{self, *};
use harness::*;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pull_makes_zero_upstream_blob_requests() {
    let env = Env::default().await;
    let img = env.fake.add_image(
        "library/app",
        Some("v1"),
        &[
            pseudo_random_bytes(10, 300_000),
            pseudo_random_bytes(11, 40_000),
        ],
    );
    env.pull("library/app", "v1", &img).await;
    for (d, _) in &img.layers {
        assert_eq!(
            env.fake.blob_gets(d),
            1,
            "first pull: one upstream GET per layer {d}"
        );
    }
    assert_eq!(
        env.fake.blob_gets(&img.config_digest),
        1,
        "first pull: one upstream GET of the config"
    );
    let blob_gets = env.fake.blob_gets_total();
    let manifest_gets = env.fake.manifest_gets_total();
    let total = env.fake.total_requests();

    env.pull("library/app", "v1", &img).await;
    assert_eq!(
        env.fake.blob_gets_total(),
        blob_gets,
        "second pull made upstream blob GETs"
    );
    assert_eq!(
        env.fake.manifest_gets_total(),
        manifest_gets,
        "second pull made upstream manifest GETs"
    );
    assert_eq!(
        env.fake.total_requests(),
        total,
        "second pull inside tag_ttl made upstream requests: {:?}",
        &env.fake.requests()[total..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_cold_requests_make_one_upstream_fetch() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(20, 1 << 20);
    let d = env.fake.add_blob("library/app", data.clone());
    // 32 chunks × 20 ms ≈ 0.65 s upstream, so all 50 requests overlap the fill.
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(20));
    let url = env.blob_url("library/app", &d);
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (c, url, barrier) = (env.c.clone(), url.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let out = http::send(c.get(&url))
                .await
                .map_err(|e| format!("client {i}: {e:?}"))?;
            if out.status != 200 {
                return Err(format!("client {i}: status {}", out.status));
            }
            let b = out.body.map_err(|e| format!("client {i}: body: {e}"))?;
            Ok::<String, String>(format!("sha256:{}", sha256_hex(&b)))
        }));
    }
    let t0 = Instant::now();
    for t in tasks {
        let got = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("client finished")
            .expect("join");
        assert_eq!(got, Ok(d.clone()), "every client gets the exact bytes");
    }
    assert_eq!(
        env.fake.blob_gets(&d),
        1,
        "50 concurrent cold requests must make exactly 1 upstream GET"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .expect("blob committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_on_cold_blob_returns_right_bytes() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(30, 200_000);
    let d = env.fake.add_blob("library/app", data.clone());
    let url = env.blob_url("library/app", &d);

    let r = get_range(&env.c, &url, "bytes=1000-1999").await;
    assert_eq!(r.status, 206, "cold Range");
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 1000-1999/200000")
    );
    assert_eq!(r.header("content-length").as_deref(), Some("1000"));
    assert_eq!(&r.bytes()[..], &data[1000..2000]);

    let r = get_range(&env.c, &url, "bytes=199990-").await;
    assert_eq!(r.status, 206, "open-ended Range");
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 199990-199999/200000")
    );
    assert_eq!(&r.bytes()[..], &data[199_990..]);

    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .expect("a Range miss still fills the whole blob");
    let r = get_range(&env.c, &url, "bytes=5-9").await;
    assert_eq!(r.status, 206, "Range on a hit");
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 5-9/200000")
    );
    assert_eq!(&r.bytes()[..], &data[5..10]);
    let r = get_range(&env.c, &url, "bytes=-100").await;
    assert_eq!(r.status, 206, "suffix Range on a hit");
    assert_eq!(&r.bytes()[..], &data[199_900..]);
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));

    let r = get_range(&env.c, &url, "bytes=200000-200010").await;
    assert_eq!(r.status, 416, "unsatisfiable Range on a hit");

    let small = pseudo_random_bytes(31, 1000);
    let d2 = env.fake.add_blob("library/app", small.clone());
    let r = get_range(&env.c, &env.blob_url("library/app", &d2), "bytes=5000-").await;
    assert_eq!(r.status, 416, "unsatisfiable Range on a miss");

    assert_eq!(
        env.fake.blob_gets(&d),
        1,
        "cold Ranges + hit Ranges should make one upstream GET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ns_connects_nowhere() {
    let env = Env::default().await;
    let img = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(40, 1000)]);
    for path in [
        "/v2/library/app/manifests/v1?ns=evil.example.com".to_string(),
        format!(
            "/v2/library/app/blobs/{}?ns=evil.example.com",
            img.layers[0].0
        ),
        "/v2/library/app/manifests/v1?ns=127.0.0.1:1".to_string(),
    ] {
        let r = env.get(&path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_code().as_deref(), Some("NAME_UNKNOWN"), "{path}");
    }
    assert_eq!(
        env.fake.total_requests(),
        0,
        "an unknown ns must reach no upstream"
    );

    // A first path component that is no upstream is just part of the repository name.
    let other = env.fake.add_image(
        "evil.example.com/app",
        Some("v1"),
        &[pseudo_random_bytes(41, 1000)],
    );
    env.pull("evil.example.com/app", "v1", &other).await;
    assert_eq!(env.fake.manifest_gets("v1"), 1);
    assert!(env
        .fake
        .requests()
        .iter()
        .all(|r| r.path.starts_with("/v2/evil.example.com/app/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_ns_path_prefix_and_library_prefix() {
    let hub = FakeUpstream::start_default().await;
    let ghcr = FakeUpstream::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let ups = upstream_toml("docker.io", &hub.url(), true, "")
        + &upstream_toml("ghcr.io", &ghcr.url(), false, "");
    let server = start_wharf(dir.path(), "tag_ttl = \"5m\"", &ups).await;
    let base = format!("http://{}", server.local_addr());
    let c = client();
    let hub_img = hub.add_image("library/alpine", Some("3"), &[pseudo_random_bytes(50, 500)]);
    let gh_img = ghcr.add_image("org/app", Some("3"), &[pseudo_random_bytes(51, 500)]);
    let gh_single = ghcr.add_image("alpine", Some("3"), &[pseudo_random_bytes(52, 500)]);
    let gh_lib = ghcr.add_image("library/alpine", Some("3"), &[pseudo_random_bytes(53, 500)]);

    let cases: [(&str, &Image); 7] = [
        ("/v2/alpine/manifests/3", &hub_img),
        ("/v2/library/alpine/manifests/3", &hub_img),
        ("/v2/alpine/manifests/3?ns=docker.io", &hub_img),
        ("/v2/docker.io/alpine/manifests/3", &hub_img),
        ("/v2/org/app/manifests/3?ns=ghcr.io", &gh_img),
        ("/v2/ghcr.io/alpine/manifests/3", &gh_single),
        ("/v2/ghcr.io/library/alpine/manifests/3", &gh_lib),
    ];
    for (path, want) in cases {
        let r = get(&c, &format!("{base}{path}")).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        assert_eq!(
            r.header("docker-content-digest").as_deref(),
            Some(want.manifest_digest.as_str()),
            "{path} routed to the wrong upstream or repository"
        );
        assert_eq!(r.bytes(), want.manifest, "{path}");
    }
    // Blobs route the same way.
    let (ld, lb) = &gh_img.layers[0];
    let r = get(&c, &format!("{base}/v2/ghcr.io/org/app/blobs/{ld}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.bytes(), lb);
    assert!(
        hub.requests()
            .iter()
            .all(|r| r.path.starts_with("/v2/library/alpine/")),
        "{:?}",
        hub.requests()
    );
    assert_eq!(
        ghcr.count_where(|r| r.path.starts_with("/v2/library/alpine/")),
        1,
        "no library/ prefix for ghcr.io"
    );
    tokio::time::timeout(Duration::from_secs(15), server.shutdown())
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_cache() {
    let mut env = Env::default().await;
    let img = env.fake.add_image(
        "library/app",
        Some("v1"),
        &[pseudo_random_bytes(60, 100_000)],
    );
    env.pull("library/app", "v1", &img).await;
    let (ld, lb) = img.layers[0].clone();
    env.wait_committed(&ld, &lb, 3 * SECOND)
        .await
        .expect("layer committed before shutdown");
    env.shutdown().await;

    let url = env.fake.url();
    env.fake.clear_requests();
    env.restart_with(&url).await;
    let r = env.get(&format!("/v2/library/app/blobs/{ld}")).await;
    assert_eq!(r.status, 200, "cached blob after restart");
    assert_eq!(r.bytes(), lb);
    let r = env
        .get(&format!(
            "/v2/library/app/manifests/{}",
            img.manifest_digest
        ))
        .await;
    assert_eq!(r.status, 200, "cached manifest by digest after restart");
    assert_eq!(r.bytes(), img.manifest);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some(OCI_MANIFEST),
        "media type survives restart"
    );
    assert_eq!(
        env.fake.total_requests(),
        0,
        "cached content after restart went upstream: {:?}",
        env.fake
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );
    // Tag inside its TTL, and everything with the upstream gone.
    env.pull("library/app", "v1", &img).await;
    assert_eq!(
        env.fake.total_requests(),
        0,
        "tag inside tag_ttl after restart went upstream"
    );
    env.fake.stop().await;
    let r = env.get(&format!("/v2/library/app/blobs/{ld}")).await;
    assert_eq!(r.status, 200, "cached blob with upstream stopped");
    assert_eq!(r.bytes(), lb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_half_written_temp_file() {
    let mut env = Env::default().await;
    env.shutdown().await;
    let tmp = env.dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let junk = tmp.join("half-written-blob");
    std::fs::write(&junk, pseudo_random_bytes(61, 5000)).unwrap();
    let url = env.fake.url();
    env.restart_with(&url).await;
    let data = pseudo_random_bytes(62, 50_000);
    let d = env.fake.add_blob("library/app", data.clone());
    let r = env.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), data);
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .expect("committed");
    assert!(
        !junk.exists(),
        "a temp file from an earlier run was left in {}",
        tmp.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_server_on_same_dir_is_refused() {
    let env = Env::default().await;
    let text = config_text(
        env.dir.path(),
        "",
        &upstream_toml("docker.io", &env.fake.url(), true, ""),
    );
    let cfg = wharf::config::Config::from_toml_str(&text).expect("config");
    let second = tokio::time::timeout(Duration::from_secs(10), wharf::start(cfg))
        .await
        .expect("start returns");
    assert!(
        second.is_err(),
        "a second wharf on a data dir in use must fail to start (index lock)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_matches_get_for_manifests_and_blobs() {
    let env = Env::default().await;
    let img = env.fake.add_image(
        "library/app",
        Some("v1"),
        &[pseudo_random_bytes(70, 70_000)],
    );
    let (ld, lb) = img.layers[0].clone();
    let pick = |o: &Outcome| {
        ["content-type", "content-length", "docker-content-digest"]
            .map(|h| (h, o.header(h)))
            .to_vec()
    };

    // Manifest: HEAD miss, GET, HEAD hit.
    let murl = env.manifest_url("library/app", "v1");
    let h1 = head(&env.c, &murl).await;
    assert_eq!(h1.status, 200, "HEAD manifest miss");
    let g = get(&env.c, &murl).await;
    assert_eq!(g.status, 200);
    let h2 = head(&env.c, &murl).await;
    assert_eq!(g.header("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        g.header("docker-content-digest").as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(
        g.header("content-length"),
        Some(img.manifest.len().to_string())
    );
    assert_eq!(pick(&h1), pick(&g), "HEAD (miss) vs GET headers, manifest");
    assert_eq!(pick(&h2), pick(&g), "HEAD (hit) vs GET headers, manifest");

    // Blob: HEAD miss, GET, HEAD hit.
    let burl = env.blob_url("library/app", &ld);
    let h1 = head(&env.c, &burl).await;
    assert_eq!(h1.status, 200, "HEAD blob miss");
    let g = get(&env.c, &burl).await;
    assert_eq!(g.bytes(), lb);
    env.wait_committed(&ld, &lb, 3 * SECOND)
        .await
        .expect("committed");
    let h2 = head(&env.c, &burl).await;
    assert_eq!(
        g.header("docker-content-digest").as_deref(),
        Some(ld.as_str())
    );
    assert_eq!(g.header("content-length"), Some(lb.len().to_string()));
    assert_eq!(g.header("accept-ranges").as_deref(), Some("bytes"));
    assert_eq!(pick(&h1), pick(&g), "HEAD (miss) vs GET headers, blob");
    assert_eq!(pick(&h2), pick(&g), "HEAD (hit) vs GET headers, blob");
    assert_eq!(h2.header("accept-ranges").as_deref(), Some("bytes"));

    // No body on the wire for HEAD, hit or miss.
    let (cd, _) = (img.config_digest.clone(), ());
    for target in [
        format!("/v2/library/app/manifests/{}", img.manifest_digest),
        format!("/v2/library/app/blobs/{ld}"),
        format!("/v2/library/app/blobs/{cd}"),
    ] {
        let r = raw(env.addr(), "HEAD", &target, &[]).await;
        assert_eq!(r.status, 200, "raw HEAD {target}");
        assert!(
            r.rest.is_empty(),
            "HEAD {target} sent {} body bytes",
            r.rest.len()
        );
        assert!(
            r.header("content-length").is_some(),
            "HEAD {target} has Content-Length"
        );
    }
    // HEAD of something missing is a bodiless 404.
    let missing = sha256_digest(b"not there");
    let r = raw(
        env.addr(),
        "HEAD",
        &format!("/v2/library/app/blobs/{missing}"),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.rest.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_before_upstream() {
    let env = Env::default().await;
    let good = sha256_digest(b"x");
    let long_tag = "a".repeat(129);
    let upper_hex = format!("sha256:{}", "A".repeat(64));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "GET",
            "/v2/UPPER/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/../etc/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/../../etc/passwd/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/%2e%2e/x/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/a//b/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        ("GET", "/v2/a-/manifests/latest".into(), 400, "NAME_INVALID"),
        (
            "GET",
            format!("/v2/UPPER/blobs/{good}"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/manifests/-bad".into(),
            400,
            "TAG_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/manifests/.bad".into(),
            400,
            "TAG_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/app/manifests/{long_tag}"),
            400,
            "TAG_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/manifests/sha256:1234".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/app/manifests/{upper_hex}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/app/blobs/{upper_hex}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/blobs/latest".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/app/blobs/sha256:{}", "a".repeat(63)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/library/app/blobs/sha256:..%2F..%2F{}", "a".repeat(54)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/library/app/referrers/nope".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "POST",
            "/v2/library/app/blobs/uploads/".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "PUT",
            "/v2/library/app/manifests/v1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "PATCH",
            "/v2/library/app/blobs/uploads/0000".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            format!("/v2/library/app/manifests/{good}"),
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            format!("/v2/library/app/blobs/{good}"),
            405,
            "UNSUPPORTED",
        ),
    ];
    let mut failures = Vec::new();
    for (method, target, status, code) in &cases {
        let r = raw(env.addr(), method, target, &[]).await;
        if r.status != *status || r.error_code().as_deref() != Some(*code) {
            failures.push(format!(
                "{method} {target}: got {} {:?}, want {status} {code}",
                r.status,
                r.error_code()
            ));
        }
    }
    // Slashes make these no endpoint at all; any 4xx will do, as long as nothing goes upstream.
    for target in [
        format!("/v2/library/app/blobs/sha256:../../{}", "a".repeat(58)),
        "/v2/library/app/manifests/../../../etc/passwd".to_string(),
        "/v2/library/app/tags/list/../../x".to_string(),
    ] {
        let r = raw(env.addr(), "GET", &target, &[]).await;
        if !(400..500).contains(&r.status) {
            failures.push(format!("GET {target}: got {}, want a 4xx", r.status));
        }
    }
    assert!(
        failures.is_empty(),
        "validation failures:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        env.fake.total_requests(),
        0,
        "invalid requests reached upstream: {:?}",
        env.fake
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect::<Vec<_>>()
    );

    // Valid but absent.
    let r = env.get("/v2/library/app/manifests/nope").await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (404, Some("MANIFEST_UNKNOWN".into())),
        "missing manifest"
    );
    let r = env.get(&format!("/v2/library/app/manifests/{good}")).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (404, Some("MANIFEST_UNKNOWN".into())),
        "missing manifest digest"
    );
    let r = env.get(&format!("/v2/library/app/blobs/{good}")).await;
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (404, Some("BLOB_UNKNOWN".into())),
        "missing blob"
    );
    let r = head(&env.c, &env.blob_url("library/app", &good)).await;
    assert_eq!(r.status, 404, "HEAD missing blob");
    let r = head(&env.c, &env.manifest_url("library/app", "nope")).await;
    assert_eq!(r.status, 404, "HEAD missing manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_works_without_upstream() {
    let env = Env::default().await;
    env.fake.stop().await;
    let r = env.get("/v2/").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let r = env.get("/v2").await;
    assert!(
        r.status == 200 || r.status.is_redirection(),
        "/v2 without slash: {}",
        r.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_list_paginates_when_upstream_ignores_n_and_last() {
    let env = Env::default().await;
    let all: Vec<String> = (1..=7).map(|i| format!("t{i:02}")).collect();
    for t in &all {
        env.fake.add_manifest(
            "library/app",
            Some(t),
            OCI_MANIFEST,
            format!("{{\"tag\":\"{t}\"}}").into_bytes(),
        );
    }
    let r = env.get("/v2/library/app/tags/list").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["name"], "library/app");
    assert_eq!(
        r.json()["tags"],
        serde_json::json!(all),
        "full list, sorted"
    );

    let mut next = Some("/v2/library/app/tags/list?n=3".to_string());
    let mut pages = Vec::new();
    for _ in 0..10 {
        let Some(path) = next.take() else { break };
        let r = env.get(&path).await;
        assert_eq!(r.status, 200, "{path}");
        let tags: Vec<String> =
            serde_json::from_value(r.json()["tags"].clone()).expect("tags array");
        pages.push(tags);
        next = r.header("link").map(|l| {
            assert!(l.contains("rel=\"next\""), "Link: {l}");
            let url = &l[l.find('<').expect("<") + 1..l.find('>').expect(">")];
            match url.find("/v2/") {
                Some(i) => url[i..].to_string(),
                None => panic!("Link target {url:?} is not a /v2/ path"),
            }
        });
    }
    assert!(next.is_none(), "pagination did not end after 10 pages");
    assert_eq!(
        pages,
        vec![all[0..3].to_vec(), all[3..6].to_vec(), all[6..7].to_vec()],
        "pages of n=3 following Link"
    );

    let r = env.get("/v2/library/app/tags/list?n=2&last=t03").await;
    assert_eq!(r.json()["tags"], serde_json::json!(["t04", "t05"]));
    assert!(
        r.header("link").is_some(),
        "more tags follow t05, so a Link is due"
    );
    let r = env.get("/v2/library/app/tags/list?last=t07").await;
    let tags = r.json()["tags"].clone();
    assert!(
        tags.is_null() || tags == serde_json::json!([]),
        "nothing after the last tag: {tags}"
    );
    assert!(r.header("link").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_ttl_revalidates_with_head_and_follows_moved_tags() {
    let env = Env::start(Options::default(), "tag_ttl = \"1s\"", "").await;
    let a = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(80, 1000)]);
    let murl = env.manifest_url("library/app", "v1");
    let by_digest = env.manifest_url("library/app", &a.manifest_digest);

    assert_eq!(get(&env.c, &murl).await.bytes(), a.manifest);
    assert_eq!(get(&env.c, &by_digest).await.bytes(), a.manifest);
    let n0 = env.fake.total_requests();
    assert_eq!(get(&env.c, &murl).await.bytes(), a.manifest);
    assert_eq!(
        env.fake.total_requests(),
        n0,
        "inside tag_ttl: no upstream call"
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let gets = env.fake.manifest_gets_total();
    let r = get(&env.c, &murl).await;
    assert_eq!(r.bytes(), a.manifest);
    assert_eq!(
        env.fake.manifest_heads("v1"),
        1,
        "after tag_ttl: one upstream HEAD of the tag"
    );
    assert_eq!(
        env.fake.manifest_gets_total(),
        gets,
        "unchanged digest: no upstream manifest GET"
    );
    let n1 = env.fake.total_requests();
    assert_eq!(get(&env.c, &by_digest).await.bytes(), a.manifest);
    assert_eq!(
        env.fake.total_requests(),
        n1,
        "a digest reference never goes upstream again"
    );
    assert_eq!(get(&env.c, &murl).await.bytes(), a.manifest);
    assert_eq!(
        env.fake.total_requests(),
        n1,
        "revalidation restarts the TTL"
    );

    // Move the tag.
    let b = env
        .fake
        .add_image("library/app", None, &[pseudo_random_bytes(81, 1000)]);
    env.fake.set_tag("library/app", "v1", &b.manifest_digest);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get(&env.c, &murl).await;
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(b.manifest_digest.as_str()),
        "moved tag"
    );
    assert_eq!(r.bytes(), b.manifest);
    let new_gets = env.fake.manifest_gets("v1") + env.fake.manifest_gets(&b.manifest_digest);
    assert_eq!(
        new_gets, 2,
        "the new manifest is fetched once (the first v1 GET + one for the move)"
    );
    let n2 = env.fake.total_requests();
    assert_eq!(get(&env.c, &murl).await.bytes(), b.manifest);
    assert_eq!(
        env.fake.total_requests(),
        n2,
        "inside the new TTL: no upstream call"
    );
    // The old digest is still served from cache.
    assert_eq!(get(&env.c, &by_digest).await.bytes(), a.manifest);
    assert_eq!(env.fake.total_requests(), n2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_tag_is_served_when_upstream_fails() {
    let env = Env::start(
        Options::default(),
        "tag_ttl = \"1s\"\nstale_if_error = \"24h\"",
        "",
    )
    .await;
    let a = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(90, 1000)]);
    let murl = env.manifest_url("library/app", "v1");
    assert_eq!(get(&env.c, &murl).await.bytes(), a.manifest);

    env.fake.fault(
        "v1",
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get(&env.c, &murl).await;
    assert_eq!(r.status, 200, "upstream 503 after tag_ttl: serve stale");
    assert_eq!(r.bytes(), a.manifest);
    assert!(
        env.fake.count_where(|r| r.path.ends_with("/manifests/v1")) >= 2,
        "it did try upstream"
    );

    env.fake.stop().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get(&env.c, &murl).await;
    assert_eq!(r.status, 200, "upstream down after tag_ttl: serve stale");
    assert_eq!(r.bytes(), a.manifest);
    let r = env
        .get(&format!("/v2/library/app/blobs/{}", a.layers[0].0))
        .await;
    assert!(
        r.status == 200 || r.status.is_server_error(),
        "uncached blob with upstream down: {}",
        r.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_fetch_does_not_pull_every_platform() {
    let env = Env::default().await;
    let amd = env
        .fake
        .add_image("library/app", None, &[pseudo_random_bytes(100, 1000)]);
    let arm = env
        .fake
        .add_image("library/app", None, &[pseudo_random_bytes(101, 1000)]);
    let s390 = env
        .fake
        .add_image("library/app", None, &[pseudo_random_bytes(102, 1000)]);
    let (idx, idx_bytes) = env.fake.add_index(
        "library/app",
        Some("multi"),
        &[(&amd, "amd64"), (&arm, "arm64"), (&s390, "s390x")],
    );
    let r = env.get("/v2/library/app/manifests/multi").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), idx_bytes);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(idx.as_str())
    );
    env.pull("library/app", &arm.manifest_digest, &arm).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for other in [&amd, &s390] {
        assert_eq!(
            env.fake
                .count_where(|r| r.path.ends_with(&other.manifest_digest)),
            0,
            "fetched an unasked platform"
        );
        assert_eq!(
            env.fake
                .count_where(|r| r.path.ends_with(&other.layers[0].0)),
            0,
            "fetched an unasked layer"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_proxied() {
    let env = Env::default().await;
    let img = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(110, 1000)]);
    let sig = env.fake.add_referrer(
        "library/app",
        &img.manifest_digest,
        img.manifest.len(),
        "application/vnd.dev.cosign.artifact.sig.v1+json",
    );
    let r = env
        .get(&format!(
            "/v2/library/app/referrers/{}",
            img.manifest_digest
        ))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("content-type").as_deref(), Some(OCI_INDEX));
    let v = r.json();
    assert_eq!(
        v["manifests"][0]["digest"].as_str(),
        Some(sig.as_str()),
        "{v}"
    );
    let r = env.get(&format!("/v2/library/app/manifests/{sig}")).await;
    assert_eq!(r.status, 200, "the referrer manifest itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_file_layout_and_no_temp_leftovers() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(120, 256 * 1024);
    let d = env.fake.add_blob("library/app", data.clone());
    let r = env.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.bytes(), data);
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "blob not at <dir>/blobs/sha256/<2hex>/<hex>: {e}; files: {:?}",
                files_under(env.dir.path())
            )
        });
    env.wait_tmp_empty(3 * SECOND)
        .await
        .unwrap_or_else(|left| panic!("temp files left after a completed fill: {left:?}"));
    let blob_files: Vec<_> = files_under(&env.dir.path().join("blobs"));
    assert_eq!(blob_files, vec![env.blob_path(&d)], "exactly one blob file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ranges_join_one_growing_fill() {
    let env = Env::default().await;
    let len = 1 << 20;
    let data = pseudo_random_bytes(130, len);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(15)); // ≈ 0.5 s
    let url = env.blob_url("library/app", &d);
    let ranges = [
        (0, 99),
        (500_000, 500_999),
        (len - 10, len - 1),
        (1000, 300_000),
        (len - 100_000, len - 1),
    ];
    let mut tasks = Vec::new();
    for (i, (a, b)) in ranges.into_iter().enumerate() {
        let (c, url) = (env.c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await; // join at different fill levels
            (a, b, get_range(&c, &url, &format!("bytes={a}-{b}")).await)
        }));
    }
    let full = get(&env.c, &url).await;
    assert_eq!(full.bytes(), data);
    for t in tasks {
        let (a, b, r) = tokio::time::timeout(Duration::from_secs(15), t)
            .await
            .expect("done")
            .expect("join");
        assert_eq!(r.status, 206, "bytes={a}-{b}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {a}-{b}/{len}")),
            "bytes={a}-{b}"
        );
        assert!(r.bytes()[..] == data[a..=b], "bytes={a}-{b}: wrong bytes");
    }
    assert_eq!(
        env.fake.blob_gets(&d),
        1,
        "Range readers must join the one fill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_blob_is_served() {
    let env = Env::default().await;
    let d = env.fake.add_blob("library/app", Vec::<u8>::new());
    let r = env.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").as_deref(), Some("0"));
    assert!(r.bytes().is_empty());
    env.wait_committed(&d, b"", 3 * SECOND)
        .await
        .expect("empty blob committed");
    let r = env.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.status, 200, "empty blob hit");
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(d.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_media_types_are_preserved() {
    let env = Env::default().await;
    let cfg = env.fake.add_blob(
        "library/app",
        b"{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec(),
    );
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_V2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cfg, "size": 42},
        "layers": []
    });
    let mb = serde_json::to_vec(&m).unwrap();
    let md = env.fake.add_manifest(
        "library/app",
        Some("docker"),
        DOCKER_MANIFEST_V2,
        mb.clone(),
    );
    let list = serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST,
        "manifests": [{"mediaType": DOCKER_MANIFEST_V2, "digest": md, "size": mb.len(), "platform": {"architecture": "amd64", "os": "linux"}}]
    });
    let lb = serde_json::to_vec(&list).unwrap();
    let ld = env.fake.add_manifest(
        "library/app",
        Some("list"),
        DOCKER_MANIFEST_LIST,
        lb.clone(),
    );
    for (reference, ct, bytes, digest) in [
        ("docker", DOCKER_MANIFEST_V2, &mb, &md),
        ("list", DOCKER_MANIFEST_LIST, &lb, &ld),
    ] {
        for _ in 0..2 {
            // miss, then hit
            let r = env
                .get(&format!("/v2/library/app/manifests/{reference}"))
                .await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("content-type").as_deref(), Some(ct), "{reference}");
            assert_eq!(
                r.header("docker-content-digest").as_deref(),
                Some(digest.as_str()),
                "{reference}"
            );
            assert_eq!(&r.bytes()[..], &bytes[..], "{reference}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_manifest_requests_accept_every_manifest_type() {
    // Docker Hub answers by the Accept header: without the index types, a
    // multi-arch tag comes back as something else or not at all.
    let env = Env::default().await;
    let img = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(140, 100)]);
    env.pull("library/app", "v1", &img).await;
    let reqs: Vec<_> = env
        .fake
        .registry_requests()
        .into_iter()
        .filter(|r| r.path.contains("/manifests/"))
        .collect();
    assert!(!reqs.is_empty());
    for r in reqs {
        let accept = r
            .headers
            .get_all("accept")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        for t in [
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST_V2,
            DOCKER_MANIFEST_LIST,
        ] {
            assert!(
                accept.contains(t),
                "{} {} Accept lacks {t}: {accept:?}",
                r.method,
                r.path
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_manifest_by_tag_is_rejected() {
    // Upstream says Docker-Content-Digest: X but the bytes hash to something else.
    let env = Env::default().await;
    let img = env
        .fake
        .add_image("library/app", Some("v1"), &[pseudo_random_bytes(150, 100)]);
    env.fake.fault("v1", Fault::WrongByte { at: 20 });
    let r = http::send(env.c.get(env.manifest_url("library/app", "v1"))).await;
    if let Ok(o) = &r {
        assert!(
            !o.looks_complete_ok(),
            "served a tag manifest whose bytes do not match upstream's Docker-Content-Digest: status {} digest header {:?}",
            o.status,
            o.header("docker-content-digest")
        );
    }
    env.fake.clear_fault("v1");
    let r = env.get("/v2/library/app/manifests/v1").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.bytes(),
        img.manifest,
        "after upstream recovers, the right manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_evicts_least_recently_used_blobs() {
    let fake = FakeUpstream::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    // Budget 1,000,000 bytes: evict above 900,000, down to 800,000.
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[storage]\ndir = \"{}\"\nmax_size = 1000000\nhigh_watermark = 0.9\nlow_watermark = 0.8\n[cache]\ntag_ttl = \"5m\"\n{}",
        dir.path().display(),
        upstream_toml("docker.io", &fake.url(), true, "")
    );
    let cfg = wharf::config::Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e:?}"));
    let server = wharf::start(cfg).await.unwrap_or_else(|e| panic!("{e:?}"));
    let base = format!("http://{}", server.local_addr());
    let c = client();
    let blobs: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            let b = pseudo_random_bytes(160 + i, 250_000);
            (fake.add_blob("library/app", b.clone()), b)
        })
        .collect();
    let fetch = |i: usize| {
        let (c, url) = (
            c.clone(),
            format!("{base}/v2/library/app/blobs/{}", blobs[i].0),
        );
        async move { get(&c, &url).await }
    };
    let committed = |i: usize| blob_path(dir.path(), &blobs[i].0).exists();
    let wait_committed = |i: usize| async move {
        for _ in 0..120 {
            if committed(i) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("blob {i} never committed");
    };
    for (i, blob) in blobs.iter().enumerate().take(3) {
        assert_eq!(fetch(i).await.bytes(), blob.1);
        wait_committed(i).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // coarse access clocks
    assert_eq!(fetch(0).await.bytes(), blobs[0].1, "touch blob 0");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(fetch(3).await.bytes(), blobs[3].1);
    wait_committed(3).await;
    let t0 = Instant::now();
    while committed(1) && committed(2) && t0.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let on_disk: u64 = files_under(&dir.path().join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(
        on_disk <= 900_000,
        "blobs on disk {on_disk} bytes, over the high watermark"
    );
    assert!(
        committed(0),
        "blob 0 was used most recently before 3 and must survive"
    );
    assert!(committed(3), "the newest blob must survive");
    assert!(
        !(committed(1) && committed(2)),
        "one of the least recently used blobs must be evicted"
    );
    // An evicted blob is simply fetched again.
    let evicted = if committed(1) { 2 } else { 1 };
    let before = fake.blob_gets(&blobs[evicted].0);
    assert_eq!(fetch(evicted).await.bytes(), blobs[evicted].1);
    assert_eq!(
        fake.blob_gets(&blobs[evicted].0),
        before + 1,
        "evicted blob refetched from upstream"
    );
    tokio::time::timeout(Duration::from_secs(15), server.shutdown())
        .await
        .expect("shutdown");
}
