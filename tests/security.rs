//! Who may reach what: client authentication, the pull policy, no
//! cross-repository leaks from the cache, and no open proxy. In-process,
//! against fake upstreams that count every request.

mod common;
mod harness;

use base64::Engine as _;
use common::fake_upstream::{pseudo_random_bytes, FakeUpstream, Options};
use common::http::{self, Outcome};
use harness::{start_wharf, upstream_toml};
use std::time::Duration;

const TTL: &str = "tag_ttl = \"5m\"";

fn basic(user: &str, password: &str) -> String {
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// An htpasswd file with one bcrypt user, in `dir`; returns its `[auth]` table.
fn auth_table(dir: &std::path::Path, user: &str, password: &str) -> String {
    let hash = bcrypt::hash(password, 4).expect("bcrypt");
    let path = dir.join("htpasswd");
    std::fs::write(&path, format!("{user}:{hash}\n")).expect("write htpasswd");
    format!("[auth]\nhtpasswd = \"{}\"\n", path.display())
}

async fn get_as(client: &reqwest::Client, url: &str, authorization: Option<&str>) -> Outcome {
    let mut req = client.get(url);
    if let Some(value) = authorization {
        req = req.header("authorization", value);
    }
    http::send(req).await.expect("request")
}

fn client_from(source: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(Some(source.parse().expect("address")))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_challenges_anonymous_clients_and_admits_htpasswd_users() {
    let private = FakeUpstream::start_default().await;
    let public = FakeUpstream::start_default().await;
    let secret = private.add_image("team/app", Some("v1"), &[pseudo_random_bytes(1, 3000)]);
    let open = public.add_image("library/alpine", Some("3"), &[pseudo_random_bytes(2, 2000)]);
    let dir = tempfile::tempdir().unwrap();
    let upstreams = auth_table(dir.path(), "alice", "s3cret")
        + &upstream_toml("private.test", &private.url(), true, "require_auth = true")
        + &upstream_toml("docker.io", &public.url(), false, "");
    let server = start_wharf(dir.path(), TTL, &upstreams).await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let manifest = format!("{base}/v2/team/app/manifests/v1");

    // The version check challenges, since the default upstream needs a login.
    let ping = get_as(&c, &format!("{base}/v2/"), None).await;
    assert_eq!(ping.status, 401);
    assert_eq!(
        ping.header("www-authenticate").as_deref(),
        Some("Basic realm=\"wharf\", charset=\"UTF-8\"")
    );
    assert_eq!(ping.error_code().as_deref(), Some("UNAUTHORIZED"));
    assert_eq!(
        get_as(&c, &format!("{base}/v2/"), Some(&basic("alice", "s3cret")))
            .await
            .status,
        200
    );

    for (authorization, expected) in [
        (None, 401),
        (Some(basic("alice", "wrong")), 401),
        (Some(basic("mallory", "s3cret")), 401),
        (Some("Bearer something".to_string()), 401),
        (Some(basic("", "")), 401),
    ] {
        let resp = get_as(&c, &manifest, authorization.as_deref()).await;
        assert_eq!(resp.status, expected, "{authorization:?}: {:?}", resp.body);
        assert!(resp.header("www-authenticate").is_some());
    }
    assert_eq!(
        private.total_requests(),
        0,
        "nothing goes upstream before the client logs in"
    );

    let ok = get_as(&c, &manifest, Some(&basic("alice", "s3cret"))).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.bytes(), secret.manifest);
    let layer = &secret.layers[0].0;
    let blob_url = format!("{base}/v2/team/app/blobs/{layer}");
    assert_eq!(get_as(&c, &blob_url, None).await.status, 401);
    let blob = get_as(&c, &blob_url, Some(&basic("alice", "s3cret"))).await;
    assert_eq!(blob.bytes(), secret.layers[0].1);

    // The public mirror stays open to anonymous clients, but credentials
    // that are sent are checked.
    let public_url = format!("{base}/v2/library/alpine/manifests/3?ns=docker.io");
    let anonymous = get_as(&c, &public_url, None).await;
    assert_eq!(anonymous.status, 200, "{:?}", anonymous.body);
    assert_eq!(anonymous.bytes(), open.manifest);
    assert_eq!(
        get_as(&c, &public_url, Some(&basic("", ""))).await.status,
        200
    );
    assert_eq!(
        get_as(&c, &public_url, Some(&basic("alice", "nope")))
            .await
            .status,
        401
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_back_off_per_address() {
    let fake = FakeUpstream::start_default().await;
    fake.add_image("team/app", Some("v1"), &[pseudo_random_bytes(3, 100)]);
    let dir = tempfile::tempdir().unwrap();
    let upstreams = auth_table(dir.path(), "alice", "s3cret")
        + &upstream_toml("docker.io", &fake.url(), true, "require_auth = true");
    let server = start_wharf(dir.path(), TTL, &upstreams).await;
    let url = format!("http://{}/v2/team/app/manifests/v1", server.local_addr());
    let attacker = client_from("127.0.0.1");
    let right = basic("alice", "s3cret");

    for i in 0..5 {
        let resp = get_as(&attacker, &url, Some(&basic("alice", &format!("guess{i}")))).await;
        assert_eq!(resp.status, 401, "free attempt {i}");
    }
    // The sixth try waits, even with the right password.
    let throttled = get_as(&attacker, &url, Some(&right)).await;
    assert_eq!(throttled.status, 429, "{:?}", throttled.body);
    assert_eq!(throttled.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    assert_eq!(throttled.header("retry-after").as_deref(), Some("1"));

    // Another address is not slowed by the first one's failures.
    let neighbour = client_from("127.0.0.2");
    assert_eq!(get_as(&neighbour, &url, Some(&right)).await.status, 200);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_as(&attacker, &url, Some(&right)).await.status, 200);
    // A success clears the record: the next failure is a plain 401.
    assert_eq!(
        get_as(&attacker, &url, Some(&basic("alice", "again")))
            .await
            .status,
        401
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_repository_gets_403_naming_the_rule_and_nothing_is_fetched() {
    let fake = FakeUpstream::start_default().await;
    let shared = pseudo_random_bytes(4, 4000);
    let allowed = fake.add_image("library/alpine", Some("3"), std::slice::from_ref(&shared));
    fake.add_image("team/test-tools", Some("v1"), &[shared]);
    let dir = tempfile::tempdir().unwrap();
    let policy = "[[policy]]\nname = \"no-test-images\"\ndeny = [\"docker.io/*/test-*\"]\n\
                  [[policy]]\nname = \"hub\"\nallow = [\"docker.io/library/*\", \"docker.io/team/**\"]\n";
    let upstreams = policy.to_string() + &upstream_toml("docker.io", &fake.url(), true, "");
    let server = start_wharf(dir.path(), TTL, &upstreams).await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();

    // Cache the shared layer through the allowed repository first.
    let ok = http::get(&c, &format!("{base}/v2/alpine/manifests/3")).await;
    assert_eq!(ok.status, 200);
    let layer = &allowed.layers[0].0;
    assert_eq!(
        http::get(&c, &format!("{base}/v2/alpine/blobs/{layer}"))
            .await
            .status,
        200
    );
    fake.clear_requests();

    for path in [
        "/v2/team/test-tools/manifests/v1".to_string(),
        format!("/v2/team/test-tools/blobs/{layer}"),
        "/v2/team/test-tools/tags/list".to_string(),
        format!("/v2/docker.io/team/test-tools/blobs/{layer}"),
    ] {
        let resp = http::get(&c, &format!("{base}{path}")).await;
        assert_eq!(resp.status, 403, "{path}: {:?}", resp.body);
        assert_eq!(resp.error_code().as_deref(), Some("DENIED"), "{path}");
        let message = resp.json()["errors"][0]["message"].to_string();
        assert!(
            message.contains("no-test-images") && message.contains("docker.io/team/test-tools"),
            "{message}"
        );
    }
    // Matching no allow rule is a denial too.
    let unlisted = http::get(&c, &format!("{base}/v2/other/app/manifests/v1")).await;
    assert_eq!(unlisted.status, 403);
    assert!(unlisted.json()["errors"][0]["message"]
        .to_string()
        .contains("not in any allow rule"));
    assert_eq!(fake.total_requests(), 0, "a denied pull fetches nothing");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_is_not_served_to_a_repository_that_does_not_have_it() {
    let hub = FakeUpstream::start_default().await;
    let other = FakeUpstream::start_default().await;
    let secret = hub.add_image("private/app", Some("v1"), &[pseudo_random_bytes(5, 5000)]);
    hub.add_image("public/app", Some("v1"), &[pseudo_random_bytes(6, 100)]);
    other.add_image("private/app", Some("v1"), &[pseudo_random_bytes(7, 100)]);
    let dir = tempfile::tempdir().unwrap();
    let upstreams = upstream_toml("docker.io", &hub.url(), true, "")
        + &upstream_toml("other.test", &other.url(), false, "");
    let server = start_wharf(dir.path(), TTL, &upstreams).await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let layer = &secret.layers[0].0;

    // The owner pulls: manifest and layer are now cached.
    assert_eq!(
        http::get(&c, &format!("{base}/v2/private/app/manifests/v1"))
            .await
            .status,
        200
    );
    let own = http::get(&c, &format!("{base}/v2/private/app/blobs/{layer}")).await;
    assert_eq!(own.bytes(), secret.layers[0].1);
    assert_eq!(hub.blob_gets(layer), 1);

    // Probes by digest from another repository, another upstream, by GET and HEAD.
    let probes = [
        (format!("/v2/public/app/blobs/{layer}"), "BLOB_UNKNOWN"),
        (
            format!("/v2/public/app/manifests/{}", secret.manifest_digest),
            "MANIFEST_UNKNOWN",
        ),
        (
            format!("/v2/private/app/blobs/{layer}?ns=other.test"),
            "BLOB_UNKNOWN",
        ),
        (
            format!(
                "/v2/other.test/private/app/manifests/{}",
                secret.manifest_digest
            ),
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (path, code) in &probes {
        let resp = http::get(&c, &format!("{base}{path}")).await;
        assert_eq!(resp.status, 404, "{path}: {:?}", resp.body);
        assert_eq!(resp.error_code().as_deref(), Some(*code), "{path}");
        assert_eq!(
            http::head(&c, &format!("{base}{path}")).await.status,
            404,
            "HEAD {path}"
        );
    }
    assert_eq!(hub.blob_gets(layer), 1, "the probes fetched nothing");
    assert_eq!(
        other.count_where(|r| r.method == "GET" && r.path.contains("/blobs/")),
        0
    );
    // Asking again is answered from the negative cache, without upstream.
    let before = hub.total_requests();
    let again = http::get(&c, &format!("{base}/v2/public/app/blobs/{layer}")).await;
    assert_eq!(again.status, 404);
    assert_eq!(hub.total_requests(), before);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_layer_shared_by_two_repositories_is_served_from_cache() {
    let fake = FakeUpstream::start_default().await;
    let base_layer = pseudo_random_bytes(8, 6000);
    let a = fake.add_image(
        "team/a",
        Some("v1"),
        &[base_layer.clone(), pseudo_random_bytes(9, 100)],
    );
    let b = fake.add_image(
        "team/b",
        Some("v1"),
        &[base_layer.clone(), pseudo_random_bytes(10, 100)],
    );
    fake.add_image("team/c", Some("v1"), &[base_layer]);
    let shared = a.layers[0].0.clone();
    assert_eq!(shared, b.layers[0].0);
    let dir = tempfile::tempdir().unwrap();
    let server = start_wharf(
        dir.path(),
        TTL,
        &upstream_toml("docker.io", &fake.url(), true, ""),
    )
    .await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let pull = |repo: &'static str, img: common::fake_upstream::Image| {
        let c = c.clone();
        let base = base.clone();
        async move {
            let m = http::get(&c, &format!("{base}/v2/{repo}/manifests/v1")).await;
            assert_eq!(m.status, 200);
            for (digest, bytes) in &img.layers {
                let blob = http::get(&c, &format!("{base}/v2/{repo}/blobs/{digest}")).await;
                assert_eq!(blob.status, 200, "{repo} {digest}");
                assert_eq!(&blob.bytes(), bytes);
            }
        }
    };
    pull("team/a", a).await;
    pull("team/b", b).await;
    assert_eq!(fake.blob_gets(&shared), 1, "b's base layer came from cache");
    assert_eq!(
        fake.blob_heads(&shared),
        0,
        "b's manifest lists the layer: no upstream check needed"
    );

    // A client that asks for the layer without the manifest costs one
    // upstream HEAD (remembered), still no GET.
    for _ in 0..3 {
        let blob = http::get(&c, &format!("{base}/v2/team/c/blobs/{shared}")).await;
        assert_eq!(blob.status, 200);
    }
    assert_eq!(fake.blob_heads(&shared), 1);
    assert_eq!(fake.blob_gets(&shared), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ns_naming_an_unconfigured_local_service_is_refused() {
    // A "local service" that counts every connection it gets.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((_stream, _)) = service.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let fake = FakeUpstream::start_default().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_wharf(
        dir.path(),
        TTL,
        &upstream_toml("docker.io", &fake.url(), true, ""),
    )
    .await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    let digest = format!("sha256:{}", "a".repeat(64));
    for (path, status, code) in [
        (
            format!("/v2/x/manifests/latest?ns={service_addr}"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            format!("/v2/x/blobs/{digest}?ns=localhost"),
            404,
            "NAME_UNKNOWN",
        ),
        (
            format!("/v2/{service_addr}/x/manifests/latest"),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/x/manifests/latest?ns=http://127.0.0.1/".to_string(),
            404,
            "NAME_UNKNOWN",
        ),
    ] {
        let resp = http::get(&c, &format!("{base}{path}")).await;
        assert_eq!(resp.status, status, "{path}: {:?}", resp.body);
        assert_eq!(resp.error_code().as_deref(), Some(code), "{path}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the unconfigured service received nothing"
    );
    assert_eq!(fake.total_requests(), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_upstream_may_not_redirect_to_a_private_address() {
    let fake = FakeUpstream::start(Options::default().with_redirect()).await;
    let img = fake.add_image("team/app", Some("v1"), &[pseudo_random_bytes(11, 3000)]);
    let layer = &img.layers[0].0;
    let dir = tempfile::tempdir().unwrap();
    // The fake listens on 127.0.0.1; it plays a public registry here.
    let server = start_wharf(
        dir.path(),
        TTL,
        &upstream_toml(
            "docker.io",
            &fake.url(),
            true,
            "allow_private_redirects = false",
        ),
    )
    .await;
    let base = format!("http://{}", server.local_addr());
    let c = http::client();
    // The manifest is on the upstream itself: allowed.
    assert_eq!(
        http::get(&c, &format!("{base}/v2/team/app/manifests/v1"))
            .await
            .status,
        200
    );
    let resp = http::get(&c, &format!("{base}/v2/team/app/blobs/{layer}")).await;
    assert_eq!(resp.status, 502, "{:?}", resp.body);
    let message = resp.json()["errors"][0]["message"].to_string();
    assert!(
        message.contains("refused to connect to 127.0.0.1"),
        "{message}"
    );
    assert_eq!(
        fake.redirect_gets(layer),
        0,
        "the redirect target got nothing"
    );
    assert!(!harness::blob_path(dir.path(), layer).exists());
    server.shutdown().await;

    // A host name is checked after DNS: "localhost" resolves to loopback.
    let by_name = FakeUpstream::start(Options {
        redirect_host: "localhost".into(),
        ..Options::default().with_redirect()
    })
    .await;
    let img = by_name.add_image("team/app", Some("v1"), &[pseudo_random_bytes(12, 300)]);
    let dir = tempfile::tempdir().unwrap();
    let server = start_wharf(
        dir.path(),
        TTL,
        &upstream_toml(
            "docker.io",
            &by_name.url(),
            true,
            "allow_private_redirects = false",
        ),
    )
    .await;
    let named_layer = &img.layers[0].0;
    let resp = http::get(
        &c,
        &format!(
            "http://{}/v2/team/app/blobs/{named_layer}",
            server.local_addr()
        ),
    )
    .await;
    assert_eq!(resp.status, 502, "{:?}", resp.body);
    let message = resp.json()["errors"][0]["message"].to_string();
    assert!(
        message.contains("refused to connect to localhost"),
        "{message}"
    );
    assert_eq!(by_name.redirect_gets(named_layer), 0);
    server.shutdown().await;

    // The same upstream, local by default, may redirect locally.
    let dir = tempfile::tempdir().unwrap();
    let server = start_wharf(
        dir.path(),
        TTL,
        &upstream_toml("docker.io", &fake.url(), true, ""),
    )
    .await;
    let resp = http::get(
        &c,
        &format!("http://{}/v2/team/app/blobs/{layer}", server.local_addr()),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(fake.redirect_gets(layer), 1);
    server.shutdown().await;
}
