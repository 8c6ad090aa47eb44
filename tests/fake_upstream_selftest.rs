//! Self-tests for the fake upstream, so proxy test failures can be trusted
//! to be the proxy's.

mod common;

use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_manifests_blobs_ranges_tags_and_counts() {
    let fake = FakeUpstream::start_default().await;
    let c = client();
    let img = fake.add_image(
        "library/alpine",
        Some("3.20"),
        &[pseudo_random_bytes(1, 100_000)],
    );
    let base = fake.url();

    let ping = get(&c, &format!("{base}/v2/")).await;
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );

    let m = get(&c, &format!("{base}/v2/library/alpine/manifests/3.20")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type").as_deref(), Some(OCI_MANIFEST));
    assert_eq!(
        m.header("docker-content-digest").as_deref(),
        Some(img.manifest_digest.as_str())
    );
    assert_eq!(m.bytes(), img.manifest);
    let mh = head(
        &c,
        &format!("{base}/v2/library/alpine/manifests/{}", img.manifest_digest),
    )
    .await;
    assert_eq!(mh.status, 200);
    assert_eq!(
        mh.header("content-length"),
        Some(img.manifest.len().to_string())
    );
    assert!(mh.bytes().is_empty());

    let (ld, lb) = &img.layers[0];
    let b = get(&c, &format!("{base}/v2/library/alpine/blobs/{ld}")).await;
    assert_eq!(b.status, 200);
    assert_eq!(&b.bytes(), lb);
    assert_eq!(
        b.header("docker-content-digest").as_deref(),
        Some(ld.as_str())
    );
    let r = get_range(
        &c,
        &format!("{base}/v2/library/alpine/blobs/{ld}"),
        "bytes=10-19",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").as_deref(),
        Some("bytes 10-19/100000")
    );
    assert_eq!(&r.bytes()[..], &lb[10..20]);
    let r = get_range(
        &c,
        &format!("{base}/v2/library/alpine/blobs/{ld}"),
        "bytes=-5",
    )
    .await;
    assert_eq!(&r.bytes()[..], &lb[99_995..]);
    let r = get_range(
        &c,
        &format!("{base}/v2/library/alpine/blobs/{ld}"),
        "bytes=100000-",
    )
    .await;
    assert_eq!(r.status, 416);

    // Per-repository storage: the same digest in another repo is unknown.
    let nf = get(&c, &format!("{base}/v2/library/other/blobs/{ld}")).await;
    assert_eq!(nf.status, 404);
    assert_eq!(nf.error_code().as_deref(), Some("BLOB_UNKNOWN"));
    let nf = get(&c, &format!("{base}/v2/library/alpine/manifests/nope")).await;
    assert_eq!(nf.error_code().as_deref(), Some("MANIFEST_UNKNOWN"));

    fake.add_manifest("library/alpine", Some("3.19"), OCI_MANIFEST, b"{}".to_vec());
    let t = get(&c, &format!("{base}/v2/library/alpine/tags/list?n=1")).await;
    assert_eq!(
        t.json()["tags"],
        serde_json::json!(["3.19", "3.20"]),
        "pagination ignored by default"
    );
    assert!(t.header("link").is_none());

    let sig = fake.add_referrer(
        "library/alpine",
        &img.manifest_digest,
        img.manifest.len(),
        "application/vnd.dev.cosign",
    );
    let refs = get(
        &c,
        &format!("{base}/v2/library/alpine/referrers/{}", img.manifest_digest),
    )
    .await;
    assert_eq!(refs.header("content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(
        refs.json()["manifests"][0]["digest"].as_str(),
        Some(sig.as_str())
    );

    assert_eq!(fake.manifest_gets("3.20"), 1);
    assert_eq!(fake.manifest_heads(&img.manifest_digest), 1);
    assert_eq!(
        fake.blob_gets(ld),
        5,
        "4 in library/alpine + 1 in library/other"
    );
    assert_eq!(fake.total_requests(), 11);
    assert_eq!(fake.requests()[0].path, "/v2/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honours_pagination_when_asked() {
    let fake = FakeUpstream::start(Options {
        honor_tag_pagination: true,
        ..Default::default()
    })
    .await;
    for t in ["a", "b", "c"] {
        fake.add_manifest(
            "x/y",
            Some(t),
            OCI_MANIFEST,
            format!("{{\"t\":\"{t}\"}}").into_bytes(),
        );
    }
    let t = get(&client(), &format!("{}/v2/x/y/tags/list?n=2", fake.url())).await;
    assert_eq!(t.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        t.header("link").as_deref(),
        Some("</v2/x/y/tags/list?last=b&n=2>; rel=\"next\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_auth_challenges_and_scopes_tokens() {
    let fake = FakeUpstream::start(Options::bearer_with_basic("u", "p")).await;
    let c = client();
    let d = fake.add_blob("org/app", b"hello".to_vec());
    let url = format!("{}/v2/org/app/blobs/{d}", fake.url());

    let r = get(&c, &url).await;
    assert_eq!(r.status, 401);
    let www = r.header("www-authenticate").expect("challenge");
    assert_eq!(
        www,
        format!(
            "Bearer realm=\"{}/token\",service=\"fake\",scope=\"repository:org/app:pull\"",
            fake.url()
        )
    );
    let token_url = format!(
        "{}/token?service=fake&scope=repository:org/app:pull",
        fake.url()
    );
    assert_eq!(
        get(&c, &token_url).await.status,
        401,
        "token endpoint wants Basic"
    );
    let tok = send(c.get(&token_url).basic_auth("u", Some("p")))
        .await
        .unwrap();
    assert_eq!(tok.status, 200);
    let token = tok.json()["token"].as_str().unwrap().to_string();
    assert_eq!(tok.json()["expires_in"], 60);

    let ok = send(c.get(&url).bearer_auth(&token)).await.unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(&ok.bytes()[..], b"hello");
    // A token for org/app is no good for another repository.
    fake.add_blob("org/other", b"x".to_vec());
    let wrong = send(
        c.get(format!(
            "{}/v2/org/other/blobs/{}",
            fake.url(),
            sha256_digest(b"x")
        ))
        .bearer_auth(&token),
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(fake.token_fetches(), 2);
    assert!(fake
        .registry_requests()
        .iter()
        .any(|r| r.authorization() == Some(format!("Bearer {token}"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_challenge_mode() {
    let fake = FakeUpstream::start(Options::basic("u", "p")).await;
    let c = client();
    let r = get(&c, &format!("{}/v2/", fake.url())).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Basic realm=\"fake\"")
    );
    let r = send(
        c.get(format!("{}/v2/", fake.url()))
            .basic_auth("u", Some("p")),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_mode_records_authorization_on_second_host() {
    let fake = FakeUpstream::start(Options::default().with_redirect()).await;
    let d = fake.add_blob("a/b", pseudo_random_bytes(2, 5000));
    let c = client();
    // reqwest strips Authorization on a cross-port redirect.
    let r = send(
        c.get(format!("{}/v2/a/b/blobs/{d}", fake.url()))
            .bearer_auth("secret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(sha256_digest(&r.bytes()), d);
    assert_eq!(fake.blob_gets(&d), 1);
    assert_eq!(fake.redirect_gets(&d), 1);
    assert!(!fake.redirect_saw_authorization());
    // And the fake does notice when it is sent.
    let r = send(
        c.get(format!("{}/cdn/{d}", fake.redirect_url().unwrap()))
            .bearer_auth("secret"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert!(fake.redirect_saw_authorization());
    // No redirect without following: the registry answers 307.
    let nofollow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = send(nofollow.get(format!("{}/v2/a/b/blobs/{d}", fake.url())))
        .await
        .unwrap();
    assert_eq!(r.status, 307);
    assert!(r
        .header("location")
        .unwrap()
        .starts_with(&fake.redirect_url().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_behave_as_described() {
    let fake = FakeUpstream::start_default().await;
    let data = pseudo_random_bytes(3, 300_000);
    let d = fake.add_blob("f/x", data.clone());
    let url = format!("{}/v2/f/x/blobs/{d}", fake.url());
    let c = client();

    for (name, fault) in [
        ("reset", Fault::Reset { after: 100_000 }),
        ("truncate", Fault::Truncate { after: 100_000 }),
    ] {
        fake.fault_times(&d, fault, 1);
        let r = get(&c, &url).await;
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(
            r.header("content-length"),
            Some(data.len().to_string()),
            "{name}"
        );
        assert!(
            r.body.is_err(),
            "{name}: body must fail, got {:?}",
            r.body.as_ref().map(|b| b.len())
        );
        let good = get(&c, &url).await;
        assert_eq!(good.bytes(), data, "{name}: one-shot fault must be over");
    }

    fake.fault_times(&d, Fault::WrongByte { at: 12345 }, 1);
    let r = get(&c, &url).await;
    let b = r.bytes();
    assert_eq!(b.len(), data.len());
    assert_ne!(sha256_digest(&b), d);
    assert_eq!(b.iter().zip(&data).filter(|(a, b)| a != b).count(), 1);

    fake.fault_times(
        &d,
        Fault::Stall {
            after: 1000,
            hold: Duration::from_secs(30),
        },
        1,
    );
    let short = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let r = send(short.get(&url)).await.unwrap();
    assert!(r.body.is_err(), "stall must time out the client");
    assert!(t0.elapsed() < Duration::from_secs(5));

    fake.fault_times(
        &d,
        Fault::Status {
            code: 429,
            retry_after: Some(1),
        },
        2,
    );
    let r = head(&c, &url).await;
    assert_eq!(r.status, 429);
    let r = get(&c, &url).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.error_code().as_deref(), Some("TOOMANYREQUESTS"));
    assert_eq!(get(&c, &url).await.status, 200);

    fake.fault(
        &d,
        Fault::Status {
            code: 503,
            retry_after: None,
        },
    );
    for _ in 0..3 {
        assert_eq!(get(&c, &url).await.status, 503);
    }
    fake.clear_fault(&d);

    fake.fault_times(&d, Fault::Drop, 1);
    assert!(c.get(&url).send().await.is_err(), "dropped connection");

    // Throttle: 300 KB in 64 KiB chunks with 50 ms each takes ≥ 250 ms.
    fake.throttle(&d, 64 * 1024, Duration::from_millis(50));
    let t0 = Instant::now();
    assert_eq!(get(&c, &url).await.bytes(), data);
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_connections() {
    let fake = FakeUpstream::start_default().await;
    let c = client();
    assert_eq!(get(&c, &format!("{}/v2/", fake.url())).await.status, 200);
    fake.stop().await;
    let fresh = client();
    assert!(fresh
        .get(format!("{}/v2/", fake.url()))
        .send()
        .await
        .is_err());
    fake.set_down(true); // harmless after stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_mode_drops_requests() {
    let fake = FakeUpstream::start_default().await;
    fake.set_down(true);
    assert!(client()
        .get(format!("{}/v2/", fake.url()))
        .send()
        .await
        .is_err());
    fake.set_down(false);
    assert_eq!(
        get(&client(), &format!("{}/v2/", fake.url())).await.status,
        200
    );
    assert_eq!(fake.total_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realm_on_second_host_and_slow_headers() {
    let opts = Options {
        auth: Auth::Bearer {
            basic: None,
            expires_in: 60,
        },
        realm_on_second_host: true,
        redirect_host: "localhost".into(),
        ..Default::default()
    };
    let fake = FakeUpstream::start(opts).await;
    let c = client();
    let d = fake.add_blob("a/b", b"abc".to_vec());
    let r = get(&c, &format!("{}/v2/a/b/blobs/{d}", fake.url())).await;
    let www = r.header("www-authenticate").unwrap();
    let realm = format!("{}/token", fake.redirect_url().unwrap());
    assert!(
        www.starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{www}"
    );
    assert!(realm.starts_with("http://localhost:"));
    let tok = get(
        &c,
        &format!("{realm}?service=fake&scope=repository:a/b:pull"),
    )
    .await
    .json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(fake.token_fetches(), 1);
    fake.fault_times(
        &d,
        Fault::SlowHeaders {
            delay: Duration::from_millis(600),
        },
        1,
    );
    let t0 = Instant::now();
    let r = send(
        c.get(format!("{}/v2/a/b/blobs/{d}", fake.url()))
            .bearer_auth(&tok),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(600));
    assert_eq!(&r.bytes()[..], b"abc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn understated_length_puts_the_whole_body_on_the_wire() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeUpstream::start_default().await;
    let data = pseudo_random_bytes(4, 200_000);
    let d = fake.add_blob("f/x", data.clone());
    fake.fault_times(&d, Fault::UnderstatedLength { by: 1000 }, 1);

    let mut s = tokio::net::TcpStream::connect(fake.addr()).await.unwrap();
    let req = format!("GET /v2/f/x/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut wire))
        .await
        .expect("the fake closes after the tail")
        .unwrap();
    let split = wire.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&wire[..split]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 199000"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(
        &wire[split + 4..],
        &data[..],
        "every byte follows the head, the last 1000 beyond Content-Length"
    );

    // A client that honours Content-Length sees a short, wrong body.
    fake.fault_times(&d, Fault::UnderstatedLength { by: 1000 }, 1);
    let url = format!("{}/v2/f/x/blobs/{d}", fake.url());
    let r = get(&client(), &url).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), data[..199_000]);
    // One-shot: then the whole blob again.
    assert_eq!(get(&client(), &url).await.bytes(), data);
}
