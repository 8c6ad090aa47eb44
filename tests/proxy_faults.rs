//! wharf in-process against a misbehaving fake upstream: corrupt and broken
//! bodies, error statuses, client hang-ups, auth and redirects, shutdown.

mod common;
mod harness;

use std::time::{Duration, Instant};

use common::fake_upstream::*;
use common::http::{self, *};
use harness::*;

const SECOND: Duration = Duration::from_secs(1);

/// What one client saw: a response (maybe with a broken body), or no response at all.
fn describe(r: &Result<Outcome, reqwest::Error>) -> String {
    match r {
        Ok(o) => format!(
            "status {} content-length {:?} body {}",
            o.status,
            o.header("content-length"),
            match &o.body {
                Ok(b) => format!("complete, {} bytes, sha256:{}", b.len(), sha256_hex(b)),
                Err(e) => format!("cut short: {e}"),
            }
        ),
        Err(e) => format!("no response: {e:?}"),
    }
}

/// The client accepted a full 200 body whose bytes are not `digest`'s.
fn accepted_wrong_body(r: &Result<Outcome, reqwest::Error>, digest: &str) -> bool {
    match r {
        Ok(o) if o.looks_complete_ok() => {
            format!("sha256:{}", sha256_hex(o.body.as_ref().unwrap())) != digest
        }
        _ => false,
    }
}

fn accepted_any_body(r: &Result<Outcome, reqwest::Error>) -> bool {
    matches!(r, Ok(o) if o.looks_complete_ok())
}

/// Upstream always misbehaves with `fault` for one blob: the client must not
/// accept the body, nothing may be committed, temp files go away; once the
/// upstream behaves, the next request gets the right bytes.
async fn fault_case(name: &str, fault: Fault, upstream_extra: &str, max_wait: Duration) -> Env {
    let env = Env::start(Options::default(), "tag_ttl = \"5m\"", upstream_extra).await;
    let data = pseudo_random_bytes(name.len() as u64 * 7919, 400_000);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.fault(&d, fault);
    let url = env.blob_url("library/app", &d);

    let t0 = Instant::now();
    let first = http::send(env.c.get(&url)).await;
    let took = t0.elapsed();
    eprintln!(
        "[{name}] faulty upstream -> client saw: {} after {took:?}",
        describe(&first)
    );
    assert!(
        !accepted_wrong_body(&first, &d),
        "[{name}] client accepted a complete wrong body: {}",
        describe(&first)
    );
    assert!(
        took < max_wait,
        "[{name}] the failure took {took:?} to reach the client (limit {max_wait:?})"
    );
    assert!(
        !accepted_any_body(&first),
        "[{name}] upstream never sent good bytes in time, yet the client got a complete 200: {}",
        describe(&first)
    );
    assert!(
        env.fake.blob_gets(&d) >= 1,
        "[{name}] wharf never asked upstream"
    );

    // Give a (wrong) commit a chance to happen before checking it didn't.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !env.blob_path(&d).exists(),
        "[{name}] a blob from a faulty upstream was committed at {}",
        env.blob_path(&d).display()
    );
    env.wait_tmp_empty(3 * SECOND)
        .await
        .unwrap_or_else(|left| panic!("[{name}] temp files left after a failed fill: {left:?}"));

    env.fake.clear_fault(&d);
    let before = env.fake.blob_gets(&d);
    let good = http::get(&env.c, &url).await;
    assert_eq!(
        good.status,
        200,
        "[{name}] next attempt after upstream recovered: {:?}",
        good.body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).to_string())
    );
    assert_eq!(
        format!("sha256:{}", sha256_hex(&good.bytes())),
        d,
        "[{name}] next attempt has the right bytes"
    );
    assert!(
        env.fake.blob_gets(&d) > before,
        "[{name}] the good attempt must be a new upstream GET, not a cached failure"
    );
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .unwrap_or_else(|e| panic!("[{name}] good fill not committed: {e}"));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_connection_reset_mid_body() {
    fault_case("reset", Fault::Reset { after: 150_000 }, "", 10 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_truncated_body() {
    fault_case(
        "truncate",
        Fault::Truncate { after: 150_000 },
        "",
        10 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_one_wrong_byte() {
    fault_case(
        "wrong-byte",
        Fault::WrongByte { at: 399_000 },
        "",
        10 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_slow_then_stall() {
    fault_case(
        "stall",
        Fault::Stall {
            after: 100_000,
            hold: Duration::from_secs(60),
        },
        "read_timeout = \"1s\"",
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_status_500() {
    fault_case(
        "500",
        Fault::Status {
            code: 500,
            retry_after: None,
        },
        "",
        10 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_status_503() {
    fault_case(
        "503",
        Fault::Status {
            code: 503,
            retry_after: None,
        },
        "",
        10 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_status_429_retry_after() {
    fault_case(
        "429",
        Fault::Status {
            code: 429,
            retry_after: Some(1),
        },
        "",
        10 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_connection_dropped_before_headers() {
    fault_case("drop", Fault::Drop, "", 10 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_stall_before_first_body_byte() {
    fault_case(
        "stall-at-0",
        Fault::Stall {
            after: 0,
            hold: Duration::from_secs(60),
        },
        "read_timeout = \"1s\"",
        8 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_response_headers_too_slow() {
    fault_case(
        "slow-headers",
        Fault::SlowHeaders {
            delay: Duration::from_secs(6),
        },
        "response_timeout = \"1s\"",
        4 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_fault_then_success_without_manual_clear() {
    // A transient upstream failure must not be remembered as a permanent one.
    let env = Env::default().await;
    let data = pseudo_random_bytes(200, 100_000);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.fault_times(&d, Fault::Reset { after: 10_000 }, 1);
    let url = env.blob_url("library/app", &d);
    let first = http::send(env.c.get(&url)).await;
    assert!(!accepted_wrong_body(&first, &d), "{}", describe(&first));
    // If wharf retried internally and the client got the right bytes, fine; either way the next is good.
    let second = http::get(&env.c, &url).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.bytes(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_upstream_blob_is_never_committed_or_served_whole() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(210, 512 * 1024);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.fault(&d, Fault::WrongByte { at: 300_000 });
    // Slow it down so a second client joins the same (corrupt) fill.
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(15));
    let url = env.blob_url("library/app", &d);

    let c1 = env.c.clone();
    let u1 = url.clone();
    let first = tokio::spawn(async move { http::send(c1.get(&u1)).await });
    tokio::time::sleep(Duration::from_millis(60)).await;
    let second = http::send(env.c.get(&url)).await;
    let first = first.await.expect("join");
    for (who, r) in [("first", &first), ("joining", &second)] {
        eprintln!("[corrupt] {who} client saw: {}", describe(r));
        assert!(
            !accepted_any_body(r),
            "{who} client got a complete 200 of a corrupt blob: {}",
            describe(r)
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!env.blob_path(&d).exists(), "corrupt blob committed");
    env.wait_tmp_empty(3 * SECOND)
        .await
        .unwrap_or_else(|l| panic!("temp files left: {l:?}"));
    // Late client while upstream is still corrupt: still not accepted, and not served from some cache.
    let late = http::send(env.c.get(&url)).await;
    assert!(
        !accepted_any_body(&late),
        "late client: {}",
        describe(&late)
    );
    let gets = env.fake.blob_gets(&d);
    assert!(
        gets >= 2,
        "a failed fill must not be remembered: the late client should cause a new GET (saw {gets})"
    );

    env.fake.clear_fault(&d);
    env.fake.clear_throttle(&d);
    let good = http::get(&env.c, &url).await;
    assert_eq!(good.status, 200);
    assert_eq!(good.bytes(), data);
    assert!(
        env.fake.blob_gets(&d) > gets,
        "the good request made a new upstream GET"
    );
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .expect("good blob committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_manifest_by_digest_is_rejected() {
    let env = Env::default().await;
    let img = env
        .fake
        .add_image("library/app", None, &[pseudo_random_bytes(220, 1000)]);
    env.fake
        .fault(&img.manifest_digest, Fault::WrongByte { at: 10 });
    let r = http::send(
        env.c
            .get(env.manifest_url("library/app", &img.manifest_digest)),
    )
    .await;
    assert!(
        !accepted_any_body(&r),
        "a manifest whose bytes do not match its digest was served: {}",
        describe(&r)
    );
    env.fake.clear_fault(&img.manifest_digest);
    let r = http::get(
        &env.c,
        &env.manifest_url("library/app", &img.manifest_digest),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.bytes(), img.manifest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hang_up_does_not_cancel_the_fill() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(230, 1 << 20);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(15)); // ≈ 0.5 s
    let url = env.blob_url("library/app", &d);

    // Client A reads a little and hangs up.
    let mut resp = env.c.get(&url).send().await.expect("A got headers");
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("A got a chunk");
    assert!(matches!(first, Ok(Some(_))), "A read some bytes: {first:?}");
    drop(resp);

    // Client B, concurrent with what is left of the fill.
    let b = http::get(&env.c, &url).await;
    assert_eq!(b.status, 200);
    assert_eq!(
        format!("sha256:{}", sha256_hex(&b.bytes())),
        d,
        "B gets the whole blob"
    );

    // Client C, after A has long gone: hit or joined fill, never a second upstream GET.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = http::get(&env.c, &url).await;
    assert_eq!(c.bytes(), data);
    assert_eq!(
        env.fake.blob_gets(&d),
        1,
        "A's hang-up must not cancel (and restart) the fill"
    );
    env.wait_committed(&d, &data, 3 * SECOND)
        .await
        .expect("committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_client_hang_up_still_completes_the_fill() {
    let env = Env::default().await;
    let data = pseudo_random_bytes(231, 512 * 1024);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(10));
    let mut resp = env
        .c
        .get(env.blob_url("library/app", &d))
        .send()
        .await
        .expect("headers");
    let _ = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await;
    drop(resp);
    env.wait_committed(&d, &data, 5 * SECOND)
        .await
        .expect("the fill finished and committed with no client left");
    assert_eq!(env.fake.blob_gets(&d), 1);
    env.wait_tmp_empty(2 * SECOND)
        .await
        .unwrap_or_else(|l| panic!("temp left: {l:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_not_sent_to_redirect_host() {
    let mut opts = Options::bearer().with_redirect();
    opts.blob_digest_header = false; // like Docker Hub: the digest in the URL is the truth
    let env = Env::start(opts, "tag_ttl = \"5m\"", "").await;
    let img = env.fake.add_image(
        "library/app",
        Some("v1"),
        &[
            pseudo_random_bytes(240, 200_000),
            pseudo_random_bytes(241, 3000),
        ],
    );
    env.pull("library/app", "v1", &img).await;
    assert!(
        !env.fake.redirect_requests().is_empty(),
        "blobs were fetched through the redirect"
    );
    for (d, _) in &img.layers {
        assert_eq!(env.fake.redirect_gets(d), 1, "one CDN GET for {d}");
    }
    let leaked: Vec<_> = env
        .fake
        .redirect_requests()
        .into_iter()
        .filter_map(|r| {
            r.authorization()
                .map(|a| format!("{} {} Authorization: {a}", r.method, r.path))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "Authorization sent to the redirect host: {leaked:?}"
    );
    assert!(
        env.fake
            .registry_requests()
            .iter()
            .any(|r| r.authorization().is_some_and(|a| a.starts_with("Bearer "))),
        "the registry never saw a Bearer token"
    );
    assert!(env.fake.token_fetches() >= 1);
    // Blob response from wharf carries the digest even though upstream didn't send it.
    let r = env
        .get(&format!("/v2/library/app/blobs/{}", img.layers[0].0))
        .await;
    assert_eq!(
        r.header("docker-content-digest").as_deref(),
        Some(img.layers[0].0.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_fetched_with_credentials_and_cached_per_scope() {
    let env = Env::start(
        Options::bearer_with_basic("alice", "s3cret"),
        "tag_ttl = \"5m\"",
        "username = \"alice\"\npassword = \"s3cret\"",
    )
    .await;
    let img = env.fake.add_image(
        "org/app",
        Some("v1"),
        &[
            pseudo_random_bytes(250, 5000),
            pseudo_random_bytes(251, 5000),
            pseudo_random_bytes(252, 5000),
        ],
    );
    env.pull("org/app", "v1", &img).await;
    let toks = env.fake.token_requests();
    assert_eq!(
        toks.len(),
        1,
        "one token for one scope, cached: {:?}",
        toks.iter().map(|r| &r.query).collect::<Vec<_>>()
    );
    assert!(
        toks[0]
            .authorization()
            .is_some_and(|a| a.starts_with("Basic ")),
        "token request carried Basic credentials"
    );
    assert!(
        toks[0]
            .query
            .as_deref()
            .unwrap_or("")
            .contains("scope=repository%3Aorg%2Fapp%3Apull")
            || toks[0]
                .query
                .as_deref()
                .unwrap_or("")
                .contains("scope=repository:org/app:pull"),
        "token scope: {:?}",
        toks[0].query
    );
    // A second repository is a second scope.
    let other = env
        .fake
        .add_image("org/other", Some("v1"), &[pseudo_random_bytes(253, 500)]);
    env.pull("org/other", "v1", &other).await;
    assert_eq!(env.fake.token_fetches(), 2, "a new scope needs a new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_challenge_upstream_gets_configured_credentials() {
    let env = Env::start(
        Options::basic("bob", "pw"),
        "tag_ttl = \"5m\"",
        "username = \"bob\"\npassword = \"pw\"",
    )
    .await;
    let img = env
        .fake
        .add_image("org/app", Some("v1"), &[pseudo_random_bytes(260, 5000)]);
    env.pull("org/app", "v1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_another_domain_is_never_contacted() {
    let opts = Options {
        auth: Auth::Bearer {
            basic: None,
            expires_in: 60,
        },
        realm_on_second_host: true,
        redirect_host: "localhost".into(),
        ..Default::default()
    };
    let env = Env::start(
        opts,
        "tag_ttl = \"5m\"",
        "username = \"alice\"\npassword = \"s3cret\"",
    )
    .await;
    env.fake
        .add_image("org/app", Some("v1"), &[pseudo_random_bytes(270, 500)]);
    let resp = env
        .c
        .get(env.url("/v2/org/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("DENIED") && body.contains("token realm localhost"),
        "{body}"
    );
    assert_eq!(
        env.fake.token_requests().len(),
        0,
        "an unbound realm must not be contacted at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_sent_to_a_realm_listed_in_auth_realms() {
    let opts = Options {
        auth: Auth::Bearer {
            basic: Some(("alice".into(), "s3cret".into())),
            expires_in: 60,
        },
        realm_on_second_host: true,
        redirect_host: "localhost".into(),
        ..Default::default()
    };
    let env = Env::start(
        opts,
        "tag_ttl = \"5m\"",
        "username = \"alice\"\npassword = \"s3cret\"\nauth_realms = [\"localhost\"]",
    )
    .await;
    let img = env
        .fake
        .add_image("org/app", Some("v1"), &[pseudo_random_bytes(271, 500)]);
    env.pull("org/app", "v1", &img).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_a_body_in_flight_is_bounded_and_releases_the_dir() {
    let mut env = Env::default().await;
    let data = pseudo_random_bytes(280, 1 << 20);
    let d = env.fake.add_blob("library/app", data.clone());
    env.fake.throttle(&d, 32 * 1024, Duration::from_millis(30)); // ≈ 1 s
    let mut resp = env
        .c
        .get(env.blob_url("library/app", &d))
        .send()
        .await
        .expect("headers");
    let first = resp.chunk().await;
    assert!(matches!(first, Ok(Some(_))));
    let reader = tokio::spawn(async move {
        let mut got = first.unwrap().unwrap().to_vec();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => got.extend_from_slice(&c),
                Ok(None) => return Ok(got),
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    });
    let t0 = Instant::now();
    env.shutdown().await; // panics if it takes over 15 s
    eprintln!("[shutdown] took {:?}", t0.elapsed());
    let got = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("reader ends")
        .expect("join");
    match &got {
        Ok(b) => assert_eq!(
            format!("sha256:{}", sha256_hex(b)),
            d,
            "in-flight body completed, so it must be right"
        ),
        Err(e) => eprintln!("[shutdown] in-flight body was cut: {e}"),
    }
    let url = env.fake.url();
    env.restart_with(&url).await; // the data dir is free again
    let r = env.get(&format!("/v2/library/app/blobs/{d}")).await;
    assert_eq!(r.bytes(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refreshed() {
    let opts = Options {
        auth: Auth::Bearer {
            basic: None,
            expires_in: 1,
        },
        ..Default::default()
    };
    let env = Env::start(opts, "tag_ttl = \"5m\"", "").await;
    let a = env.fake.add_blob("org/app", pseudo_random_bytes(290, 1000));
    let b = env.fake.add_blob("org/app", pseudo_random_bytes(291, 1000));
    assert_eq!(env.get(&format!("/v2/org/app/blobs/{a}")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = env.get(&format!("/v2/org/app/blobs/{b}")).await;
    assert_eq!(
        r.status, 200,
        "after the token expired upstream: {:?}",
        r.body
    );
    assert_eq!(sha256_digest(&r.bytes()), b);
    assert!(env.fake.token_fetches() >= 2, "a new token was fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_on_redirect_target_is_not_committed() {
    let env = Env::start(Options::default().with_redirect(), "tag_ttl = \"5m\"", "").await;
    let data = pseudo_random_bytes(300, 200_000);
    let d = env.fake.add_blob("library/app", data.clone());
    let url = env.blob_url("library/app", &d);
    for (name, fault) in [
        (
            "cdn-403",
            Fault::Status {
                code: 403,
                retry_after: None,
            },
        ),
        ("cdn-wrong-byte", Fault::WrongByte { at: 100 }),
        ("cdn-reset", Fault::Reset { after: 50_000 }),
    ] {
        env.fake.fault(&d, fault);
        let r = http::send(env.c.get(&url)).await;
        assert!(!accepted_any_body(&r), "[{name}] {}", describe(&r));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!env.blob_path(&d).exists(), "[{name}] committed");
    }
    env.fake.clear_fault(&d);
    let r = http::get(&env.c, &url).await;
    assert_eq!(r.bytes(), data);
    assert_eq!(env.fake.redirect_gets(&d), 4);
}
