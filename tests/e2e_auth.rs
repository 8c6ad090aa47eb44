//! Client authentication with real programs: wharf's default upstream (the
//! token-auth docker-registry of tests/real) has `require_auth = true`, and
//! the `[auth] htpasswd` file is written by Apache's real `htpasswd -B`.
//! skopeo must log in (`--creds`/`--src-creds`; anonymous and wrong
//! passwords get 401 and reach no upstream), containerd pulls with the
//! credentials as a static `Authorization` header in hosts.toml (and gets
//! 401 without it), failed logins are logged without the password, and
//! `kill -HUP` after `htpasswd -D` revokes a user at once. One wharf and one
//! upstream serve every step, in order.
//!
//! Run: `cargo test --release --test e2e_auth` (as root; needs
//! `apache2-utils` besides the packages of tests/real/README.md).

mod real;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use real::containerd::Containerd;
use real::images::Artifact;
use real::util::{find_program, find_program_from, run, run_ok, sha256_digest, CmdOutput};
use real::wharf::WharfOpts;
use real::{direct_mode, Fixture};

const ALICE: (&str, &str) = ("alice", "alice-e2e-S3cret");
const BOB: (&str, &str) = ("bob", "bob-e2e-Pa55word");
/// Distinctive, so finding it anywhere in wharf's logs is unambiguous.
const WRONG_PASSWORD: &str = "wr0ng-e2e-pw-5f3a91";

fn htpasswd(args: &[&str]) -> CmdOutput {
    let bin = find_program_from("htpasswd", "apache2-utils");
    run_ok(
        Command::new(bin).args(args),
        Duration::from_secs(30),
        &String::new,
    )
}

/// An htpasswd file with bcrypt entries for alice and bob, as an admin
/// would create it.
fn write_htpasswd(path: &Path) {
    let file = path.display().to_string();
    htpasswd(&["-B", "-b", "-c", &file, ALICE.0, ALICE.1]);
    htpasswd(&["-B", "-b", &file, BOB.0, BOB.1]);
    let text = std::fs::read_to_string(path).expect("read htpasswd");
    assert!(
        text.lines().count() == 2 && text.lines().all(|l| l.contains(":$2y$")),
        "htpasswd -B wrote no bcrypt entries:\n{text}"
    );
}

struct Skopeo<'a> {
    fx: &'a Fixture,
    authfile: PathBuf,
}

impl Skopeo<'_> {
    /// `skopeo --insecure-policy ARGS`, with an empty auth file of its own
    /// so no credentials stored on this machine are picked up.
    fn run(&self, args: &[&str]) -> CmdOutput {
        let mut c = Command::new(find_program("skopeo"));
        c.env("TMPDIR", self.fx.dir("skopeo-tmp"))
            .env("REGISTRY_AUTH_FILE", &self.authfile)
            .arg("--insecure-policy")
            .args(args);
        run(&mut c, Duration::from_secs(120))
    }

    /// `skopeo inspect --raw` of `art` on `host` (with `creds`): the output.
    fn inspect(&self, host: &str, art: &Artifact, creds: Option<(&str, &str)>) -> CmdOutput {
        let src = format!("docker://{host}/{}:{}", art.repo, art.tag);
        let creds = creds.map(|(u, p)| format!("{u}:{p}"));
        let mut args = vec!["inspect", "--raw", "--tls-verify=false"];
        if let Some(c) = &creds {
            args.extend(["--creds", c]);
        }
        args.push(&src);
        self.run(&args)
    }
}

/// The command failed, and on authentication (not on something else).
fn assert_auth_failure(out: &CmdOutput, what: &str, diag: &dyn Fn() -> String) {
    assert!(
        !out.ok(),
        "{what}: expected an authentication failure, but it succeeded\n{}\n{}",
        out.describe(),
        diag()
    );
    let text = format!("{}{}", out.stdout_str(), out.stderr_str()).to_lowercase();
    assert!(
        ["401", "unauthorized", "authentication required"]
            .iter()
            .any(|w| text.contains(w)),
        "{what}: failed, but not with 401/unauthorized/authentication required\n{}\n{}",
        out.describe(),
        diag()
    );
    eprintln!(
        "{what}: refused as expected: {}",
        out.stderr_str()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    );
}

/// wharf's request log lines for repository `repo` with HTTP `status`.
fn wharf_requests(fx: &Fixture, repo: &str, status: u16) -> usize {
    let log = fx.wharf.as_ref().expect("wharf").log_text();
    let name = format!("name={repo} ");
    let quoted = format!("name=\"{repo}\"");
    let status = format!("status={status} ");
    log.lines()
        .filter(|l| l.contains(" request "))
        .filter(|l| l.contains(&name) || l.contains(&quoted))
        .filter(|l| l.contains(&status))
        .count()
}

fn log_count(fx: &Fixture, needle: &str) -> usize {
    fx.wharf
        .as_ref()
        .expect("wharf")
        .log_text()
        .matches(needle)
        .count()
}

/// Upstream requests (any method, any status) for repository `repo`.
fn upstream_touches(fx: &Fixture, since: usize, repo: &str) -> (usize, String) {
    let log = fx.upstream.access_log().since(since);
    let prefix = format!("/v2/{repo}/");
    (log.count(|e| e.path.starts_with(&prefix)), log.dump())
}

/// `DIR/docker.io/hosts.toml`: docker.io through `mirror`, with a static
/// `Authorization` header if `basic` (user, password) is given, falling back
/// to `server`; returns DIR and the file's text.
fn write_hosts(
    dir: &Path,
    server: &str,
    mirror: &str,
    basic: Option<(&str, &str)>,
) -> (PathBuf, String) {
    std::fs::create_dir_all(dir.join("docker.io")).expect("hosts dir");
    let header = basic
        .map(|(u, p)| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            format!("\n  [host.\"{mirror}\".header]\n    Authorization = \"Basic {token}\"\n")
        })
        .unwrap_or_default();
    let text = format!(
        r#"server = "{server}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
{header}"#
    );
    std::fs::write(dir.join("docker.io/hosts.toml"), &text).expect("write hosts.toml");
    (dir.to_path_buf(), text)
}

/// `http://127.0.0.1:PORT` where nothing listens: containerd's fallback
/// `server`, so a refused mirror cannot be bypassed.
fn refusing_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// The raw challenge, as any client sees it first.
fn check_challenge(fx: &Fixture, art: &Artifact) {
    let base = fx.mirror_url();
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client");
    for path in [
        "/v2/".to_string(),
        format!("/v2/{}/manifests/{}", art.repo, art.tag),
    ] {
        let (status, challenge, body) = fx.rt.block_on(async {
            let r = client
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("GET");
            let status = r.status().as_u16();
            let challenge = r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (status, challenge, r.text().await.unwrap_or_default())
        });
        assert_eq!(status, 401, "anonymous GET {path}: {body}\n{}", fx.diag());
        assert_eq!(
            challenge, r#"Basic realm="wharf", charset="UTF-8""#,
            "WWW-Authenticate of GET {path}"
        );
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: 401 body is not JSON ({e}): {body}"));
        assert_eq!(
            json["errors"][0]["code"], "UNAUTHORIZED",
            "GET {path}: 401 body {body}"
        );
    }
}

#[test]
fn clients_must_log_in_to_a_require_auth_upstream() {
    if direct_mode() {
        eprintln!("WHARF_E2E_DIRECT=1: the auth test needs wharf; nothing to check");
        return;
    }
    let htpasswd_bin = find_program_from("htpasswd", "apache2-utils");
    for p in ["skopeo", "containerd", "ctr"] {
        find_program(p);
    }
    // The htpasswd file outlives the fixture (declared first, dropped last).
    let mut auth_dir = tempfile::Builder::new()
        .prefix("wharf-e2e-auth-htpasswd-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    if std::env::var("WHARF_E2E_KEEP").is_ok_and(|v| v == "1") {
        auth_dir.disable_cleanup(true);
    }
    let htpasswd_file = auth_dir.path().join("htpasswd");
    write_htpasswd(&htpasswd_file);
    let opts = WharfOpts {
        upstream_extra: "require_auth = true\n".into(),
        extra_toml: format!("[auth]\nhtpasswd = \"{}\"\n", htpasswd_file.display()),
        ..WharfOpts::default()
    };
    // Ready once the version check challenges.
    let mut fx = Fixture::start_ready("auth", &opts, 401);
    let diag = || fx.diag();
    let authfile = fx.dir("skopeo").join("auth.json");
    std::fs::write(&authfile, "{\"auths\":{}}\n").expect("write auth.json");
    let skopeo = Skopeo { fx: &fx, authfile };
    let mirror = fx.mirror_addr();
    let upstream = fx.upstream.authed.addr.clone();
    let imgs = fx.images;

    // 0. `wharf check-config` reads the htpasswd file too: the real one
    //    passes; one written by plain `htpasswd` (MD5, its default) fails.
    {
        let wharf = fx.wharf.as_ref().expect("wharf");
        let out = run(
            Command::new(real::wharf::binary())
                .arg("check-config")
                .arg(&wharf.config),
            Duration::from_secs(30),
        );
        assert!(
            out.ok(),
            "check-config of the test config\n{}",
            out.describe()
        );
        let md5_file = fx.dir("check-config").join("htpasswd-md5");
        let md5 = md5_file.display().to_string();
        run_ok(
            Command::new(&htpasswd_bin).args(["-b", "-c", &md5, "carol", "pw"]),
            Duration::from_secs(30),
            &String::new,
        );
        let config = std::fs::read_to_string(&wharf.config).expect("read wharf.toml");
        let bad = fx.dir("check-config").join("wharf.toml");
        std::fs::write(
            &bad,
            config.replace(&htpasswd_file.display().to_string(), &md5),
        )
        .expect("write config");
        let out = run(
            Command::new(real::wharf::binary())
                .arg("check-config")
                .arg(&bad),
            Duration::from_secs(30),
        );
        let text = format!("{}{}", out.stdout_str(), out.stderr_str());
        assert!(
            !out.ok() && text.contains("auth.htpasswd") && text.contains("htpasswd -B"),
            "check-config accepted (or misreported) an MD5 htpasswd file\n{}",
            out.describe()
        );
    }

    // 1. The raw challenge: 401, `Basic realm="wharf"`, OCI error body.
    check_challenge(&fx, &imgs.oci);

    // 2. skopeo without credentials: refused on authentication, and nothing
    //    for the image reaches the upstream.
    let oci = &imgs.oci;
    let before = fx.upstream.access_log().len();
    let tokens_before = fx.upstream.token.requests();
    let out = skopeo.inspect(&mirror, oci, None);
    assert_auth_failure(&out, "skopeo inspect without credentials", &diag);
    let dir = fx.dir("copy/anonymous");
    let out = skopeo.run(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{mirror}/{}:{}", oci.repo, oci.tag),
        &format!("dir:{}", dir.display()),
    ]);
    assert_auth_failure(&out, "skopeo copy without credentials", &diag);
    let (touched, dump) = upstream_touches(&fx, before, &oci.repo);
    assert_eq!(
        touched, 0,
        "anonymous skopeo reached the upstream for {}:\n{dump}",
        oci.repo
    );
    assert_eq!(
        fx.upstream.token.requests(),
        tokens_before,
        "anonymous skopeo made wharf ask the upstream for a token"
    );
    assert!(
        wharf_requests(&fx, &oci.repo, 401) >= 2,
        "wharf logged no 401 for {}\n{}",
        oci.repo,
        fx.diag()
    );

    // 3. skopeo with credentials: served, with upstream's manifest.
    let direct = skopeo.inspect(&upstream, oci, None);
    assert!(
        direct.ok(),
        "skopeo inspect on the upstream\n{}",
        direct.describe()
    );
    let upstream_digest = sha256_digest(&direct.stdout);
    assert_eq!(upstream_digest, oci.top.digest, "upstream's manifest");
    let out = skopeo.inspect(&mirror, oci, Some(ALICE));
    assert!(
        out.ok(),
        "skopeo inspect --creds through wharf\n{}\n{}",
        out.describe(),
        fx.diag()
    );
    assert_eq!(
        sha256_digest(&out.stdout),
        upstream_digest,
        "manifest through wharf differs from upstream's"
    );
    let dir = fx.dir("copy/alice");
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    let out = skopeo.run(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &format!("docker://{mirror}/{}:{}", oci.repo, oci.tag),
        &format!("dir:{}", dir.display()),
    ]);
    assert!(
        out.ok(),
        "skopeo copy --src-creds through wharf\n{}\n{}",
        out.describe(),
        fx.diag()
    );
    let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(
        sha256_digest(&manifest),
        upstream_digest,
        "copied manifest.json"
    );
    for blob in oci.native().blobs() {
        let data = std::fs::read(dir.join(blob.digest.trim_start_matches("sha256:")))
            .unwrap_or_else(|e| panic!("copied blob {}: {e}", blob.digest));
        assert_eq!(sha256_digest(&data), blob.digest, "copied blob");
    }
    // Cached now, and still not for anonymous clients.
    let out = skopeo.inspect(&mirror, oci, None);
    assert_auth_failure(
        &out,
        "skopeo inspect of a cached image without credentials",
        &diag,
    );

    // 4. A wrong password: 401, nothing upstream, logged without the password.
    let docker = &imgs.docker;
    let before = fx.upstream.access_log().len();
    let failed_before = log_count(&fx, "client login failed");
    let out = skopeo.inspect(&mirror, docker, Some((ALICE.0, WRONG_PASSWORD)));
    assert_auth_failure(&out, "skopeo inspect with a wrong password", &diag);
    let (touched, dump) = upstream_touches(&fx, before, &docker.repo);
    assert_eq!(
        touched, 0,
        "a wrong password reached the upstream for {}:\n{dump}",
        docker.repo
    );
    let log = fx.wharf.as_ref().expect("wharf").log_text();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client login failed"))
        .collect();
    assert!(
        failed.len() > failed_before && failed.iter().any(|l| l.contains(ALICE.0)),
        "wharf did not log `client login failed` for {} with a wrong password\n{}",
        ALICE.0,
        fx.diag()
    );
    eprintln!("wharf logged: {}", failed.last().unwrap_or(&""));

    // 5. containerd: credentials as a static header in hosts.toml. The
    //    fallback `server` refuses connections, so only wharf can answer.
    let server = refusing_url();
    let multi = &imgs.multi;
    let reference = multi.docker_io_ref();
    let mut ctd = Containerd::start(&fx.dir("containerd"));
    let (no_header, _) = write_hosts(
        &fx.dir("certs.d-anonymous"),
        &server,
        &fx.mirror_url(),
        None,
    );
    let before = fx.upstream.access_log().len();
    let hosts = no_header.display().to_string();
    let out = run(
        &mut ctd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            ctd.snapshotter,
            &reference,
        ]),
        Duration::from_secs(60),
    );
    assert_auth_failure(&out, "ctr pull without the Authorization header", &|| {
        format!("{}\n{}", fx.diag(), ctd.logs())
    });
    let (touched, dump) = upstream_touches(&fx, before, &multi.repo);
    assert_eq!(
        touched, 0,
        "the anonymous containerd pull reached the upstream for {}:\n{dump}",
        multi.repo
    );
    assert!(
        wharf_requests(&fx, &multi.repo, 401) >= 1,
        "the anonymous containerd pull did not get 401 from wharf\n{}",
        fx.diag()
    );
    ctd.proc.assert_alive();

    let failed_before = log_count(&fx, "client login failed");
    let (with_header, hosts_toml) =
        write_hosts(&fx.dir("certs.d"), &server, &fx.mirror_url(), Some(BOB));
    eprintln!("hosts.toml with credentials:\n{hosts_toml}");
    ctd.pull(&with_header, &reference, &|| fx.diag());
    assert_eq!(
        ctd.image_target(&reference),
        multi.top.digest,
        "containerd resolved {reference} to another digest"
    );
    ctd.verify_unpacked(&reference, multi.native());
    let log = fx.upstream.access_log();
    for blob in multi.native().blobs() {
        assert!(
            log.blob_gets_ok(&multi.repo, &blob.digest) >= 1,
            "upstream never served blob {} of {reference}, so containerd did not get it through wharf\n{}\n{}",
            blob.digest,
            log.dump(),
            fx.diag()
        );
    }
    let direct = log.count(|e| e.user_agent.contains("containerd/"));
    assert_eq!(
        direct,
        0,
        "containerd talked to the upstream:\n{}",
        log.dump()
    );
    assert!(
        wharf_requests(&fx, &multi.repo, 200) >= 1,
        "wharf logged no 200 for {}\n{}",
        multi.repo,
        fx.diag()
    );
    assert_eq!(
        log_count(&fx, "client login failed"),
        failed_before,
        "containerd's static header was refused somewhere\n{}",
        fx.diag()
    );
    drop(ctd);

    // 6. `htpasswd -D` + SIGHUP: alice is refused at once, bob still works.
    let out = skopeo.inspect(&mirror, oci, Some(ALICE));
    assert!(out.ok(), "alice before the reload\n{}", out.describe());
    htpasswd(&["-D", &htpasswd_file.display().to_string(), ALICE.0]);
    let reloads = log_count(&fx, "htpasswd reloaded");
    let pid = fx.wharf.as_ref().expect("wharf").proc.pid();
    // SAFETY: signalling the wharf process this test started, still running.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "kill -HUP {pid}");
    let start = Instant::now();
    while log_count(&fx, "htpasswd reloaded") == reloads {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "wharf did not log `htpasswd reloaded` within 5 s of SIGHUP\n{}",
            fx.diag()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = skopeo.inspect(&mirror, oci, Some(ALICE));
    assert_auth_failure(&out, "skopeo with a removed user's credentials", &diag);
    let out = skopeo.inspect(&mirror, oci, Some(BOB));
    assert!(
        out.ok() && sha256_digest(&out.stdout) == upstream_digest,
        "bob after alice was removed\n{}\n{}",
        out.describe(),
        fx.diag()
    );

    // 7. No password, right or wrong, ever reaches wharf's logs.
    fx.assert_wharf_alive();
    let wharf = fx.wharf.as_ref().expect("wharf");
    let stdout = wharf
        .proc
        .stdout_log
        .as_ref()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .unwrap_or_default();
    let all = format!("{}\n{stdout}", wharf.log_text());
    let b64 =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    for secret in [
        WRONG_PASSWORD.to_string(),
        ALICE.1.to_string(),
        BOB.1.to_string(),
        b64(ALICE.0, WRONG_PASSWORD),
        b64(ALICE.0, ALICE.1),
        b64(BOB.0, BOB.1),
    ] {
        assert!(
            !all.contains(&secret),
            "wharf's log contains the secret {secret:?}\n{}",
            fx.diag()
        );
    }
    eprintln!(
        "auth test done in {:.1?} ({} upstream requests, {} failed logins logged)",
        fx.started.elapsed(),
        fx.upstream.access_log().len(),
        log_count(&fx, "client login failed")
    );
}
