//! End-to-end tests with real programs: Debian's docker-registry (behind
//! Docker-Hub-style token auth) as the upstream, wharf in front of it, and
//! containerd/ctr, dockerd and skopeo as clients. See tests/real/README.md.
//!
//! Run: `cargo test --release --test e2e_real` (as root, with the packages
//! that `.ci/run` installs). Nothing is skipped: a missing program fails the
//! test with the command that installs it.

mod real;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use real::containerd::Containerd;
use real::dockerd::Dockerd;
use real::images::{Artifact, Image};
use real::upstream::AccessLog;
use real::util::{find_program, run_ok, sha256_digest, sha256_file, CmdOutput};
use real::{direct_mode, Fixture};

/// Every blob of the image this machine pulls was fetched from the upstream
/// (which only wharf can reach; the clients only know wharf and the
/// unreachable Docker Hub), and nothing of the other platforms was.
fn assert_upstream_served(fx: &Fixture, log: &AccessLog, art: &Artifact) {
    let img = art.native();
    for blob in img.blobs() {
        assert!(
            log.blob_gets_ok(&art.repo, &blob.digest) >= 1,
            "upstream never served blob {} of {}:{} (so the client did not get it through {})\naccess log:\n{}\n{}",
            blob.digest,
            art.repo,
            art.tag,
            fx.mirror_url(),
            log.dump(),
            fx.diag()
        );
    }
    assert_foreign_untouched(fx, log, art);
}

/// Fetch only what is asked for: never the other platform of an index.
fn assert_foreign_untouched(fx: &Fixture, log: &AccessLog, art: &Artifact) {
    for other in art.foreign() {
        let touched: Vec<&str> = other
            .blobs()
            .filter(|b| log.blob_gets(&art.repo, &b.digest) > 0)
            .map(|b| b.digest.as_str())
            .collect();
        assert!(
            touched.is_empty() && log.manifest_requests(Some("GET"), &art.repo, &other.manifest.digest) == 0,
            "{} content of {}:{} was fetched upstream although no client asked for it: blobs {touched:?}\n{}\n{}",
            other.arch,
            art.repo,
            art.tag,
            log.dump(),
            fx.diag()
        );
    }
}

/// Clients know only the mirror (and the unreachable Hub): through wharf,
/// no request reaching the upstream may come from containerd or dockerd.
fn assert_clients_never_reached_upstream(fx: &Fixture, log: &AccessLog) {
    if direct_mode() {
        return;
    }
    let direct =
        log.count(|e| e.user_agent.contains("containerd/") || e.user_agent.starts_with("docker/"));
    assert_eq!(
        direct,
        0,
        "clients talked to the upstream directly, bypassing wharf:\n{}\n{}",
        log.dump(),
        fx.diag()
    );
}

fn skopeo(fx: &Fixture, args: &[&str]) -> Command {
    let mut c = Command::new(find_program("skopeo"));
    // No /etc/containers/policy.json needed; own temp dir for big blobs.
    let tmp = fx.dir("skopeo-tmp");
    c.env("TMPDIR", tmp).arg("--insecure-policy").args(args);
    c
}

fn run_skopeo(fx: &Fixture, args: &[&str]) -> CmdOutput {
    run_ok(&mut skopeo(fx, args), Duration::from_secs(120), &|| {
        fx.diag()
    })
}

/// Every layer and the config of `img` sits in `dir` under `name(digest)`
/// with the right bytes.
fn assert_blobs_in(dir: &Path, img: &Image, name: impl Fn(&str) -> String) {
    for blob in img.blobs() {
        let path = dir.join(name(blob.digest.trim_start_matches("sha256:")));
        let got = sha256_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            (format!("sha256:{}", got.0), got.1),
            (blob.digest.clone(), blob.data.len() as u64),
            "copied blob {} is wrong",
            path.display()
        );
    }
}

#[test]
fn containerd_pulls_through_wharf_mirror() {
    let fx = Fixture::start("ctd");
    let mut ctd = Containerd::start(&fx.dir("containerd"));
    let hosts = ctd.write_hosts(&fx.mirror_url());
    let diag = || fx.diag();
    for art in [&fx.images.multi, &fx.images.docker, &fx.images.oci] {
        let reference = art.docker_io_ref();
        ctd.pull(&hosts, &reference, &diag);
        assert_eq!(
            ctd.image_target(&reference),
            art.top.digest,
            "containerd resolved {reference} to another digest"
        );
        ctd.verify_unpacked(&reference, art.native());
    }
    let log = fx.upstream.access_log();
    for art in fx.images.all() {
        assert_upstream_served(&fx, &log, art);
    }
    assert_clients_never_reached_upstream(&fx, &log);
    // The upstream's token auth was exercised, and (through wharf) tokens are
    // cached per scope: at most one per repository for this short test.
    let tokens = fx.upstream.token.requests();
    let max = if direct_mode() {
        usize::MAX
    } else {
        fx.images.all().len()
    };
    assert!(
        (1..=max).contains(&tokens),
        "{tokens} token requests, want 1..={max}\n{}",
        fx.upstream.token.summary()
    );
    eprintln!(
        "containerd test done in {:.1?} ({} upstream requests, {} token requests)",
        fx.started.elapsed(),
        log.len(),
        fx.upstream.token.requests()
    );
}

#[test]
fn docker_daemon_pulls_through_registry_mirrors() {
    let fx = Fixture::start("docker");
    let ctd = Containerd::start(&fx.dir("containerd"));
    let mut dockerd = Dockerd::start(&fx.dir("docker"), &ctd.sock, &fx.mirror_url());
    let diag = || fx.diag();
    for art in fx.images.all() {
        let name = format!("{}:{}", art.short(), art.tag);
        let out = dockerd.pull(&name, &diag);
        // The daemon falls back to the real Hub if the mirror errs; the Hub is
        // unreachable here and has no such image, so success means the mirror.
        assert!(
            out.stdout_str()
                .contains(&format!("Digest: {}", art.top.digest)),
            "docker pull {name} reported another digest:\n{}",
            out.describe()
        );
        let digests = dockerd.repo_digests(&name);
        assert!(
            digests
                .iter()
                .any(|d| d.ends_with(&format!("@{}", art.top.digest))),
            "RepoDigests of {name} are {digests:?}, want one @{}",
            art.top.digest
        );
        dockerd.verify_unpacked(&name, art.native());
    }
    let log = fx.upstream.access_log();
    for art in fx.images.all() {
        assert_upstream_served(&fx, &log, art);
    }
    assert_clients_never_reached_upstream(&fx, &log);
    eprintln!(
        "docker test done in {:.1?} ({} upstream requests)",
        fx.started.elapsed(),
        log.len()
    );
}

#[test]
fn skopeo_copy_through_wharf() {
    let fx = Fixture::start("skopeo");
    let mirror = fx.mirror_addr();
    let upstream = fx.upstream.authed.addr.clone();
    let imgs = fx.images;

    // The manifest bytes (hence digests) through the mirror are upstream's.
    for art in imgs.all() {
        for (host, what) in [(&mirror, "mirror"), (&upstream, "upstream")] {
            let src = format!("docker://{host}/{}:{}", art.repo, art.tag);
            let raw = run_skopeo(&fx, &["inspect", "--raw", "--tls-verify=false", &src]);
            assert_eq!(
                sha256_digest(&raw.stdout),
                art.top.digest,
                "skopeo inspect --raw of {src} ({what}) returned other bytes:\n{}",
                raw.stdout_str()
            );
        }
    }

    // OCI image into an OCI layout.
    let oci = &imgs.oci;
    let layout = fx.dir("copy/oci-layout");
    run_skopeo(
        &fx,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{mirror}/{}:{}", oci.repo, oci.tag),
            &format!("oci:{}:e2e", layout.display()),
        ],
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    assert_eq!(
        index["manifests"][0]["digest"],
        oci.top.digest.as_str(),
        "oci layout index.json: {index}"
    );
    assert_blobs_in(&layout.join("blobs/sha256"), oci.native(), |hex| {
        hex.to_string()
    });

    // Docker-typed image and the multi-arch index into dir: layouts.
    for art in [&imgs.docker, &imgs.multi] {
        let dir = fx.dir(&format!("copy/dir-{}", art.short()));
        run_skopeo(
            &fx,
            &[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{mirror}/{}:{}", art.repo, art.tag),
                &format!("dir:{}", dir.display()),
            ],
        );
        let manifest = std::fs::read(dir.join("manifest.json")).expect("manifest.json");
        // From an index skopeo copies this platform's image only.
        assert_eq!(
            sha256_digest(&manifest),
            art.native().manifest.digest,
            "dir:{} manifest.json",
            dir.display()
        );
        assert_blobs_in(&dir, art.native(), |hex| hex.to_string());
    }

    let log = fx.upstream.access_log();
    for art in imgs.all() {
        assert_upstream_served(&fx, &log, art);
    }
    eprintln!("skopeo test done in {:.1?}", fx.started.elapsed());
}

/// One round of pulls by every client, each with fresh local storage.
fn pull_round(fx: &Fixture, round: &str) {
    let imgs = fx.images;
    let diag = || fx.diag();
    let mut ctd = Containerd::start(&fx.dir(&format!("{round}/containerd")));
    let hosts = ctd.write_hosts(&fx.mirror_url());
    for art in imgs.all() {
        ctd.pull(&hosts, &art.docker_io_ref(), &diag);
    }
    ctd.verify_unpacked(&imgs.multi.docker_io_ref(), imgs.multi.native());

    let dir = fx.dir(&format!("{round}/skopeo-dir"));
    run_skopeo(
        fx,
        &[
            "copy",
            "--src-tls-verify=false",
            &format!(
                "docker://{}/{}:{}",
                fx.mirror_addr(),
                imgs.oci.repo,
                imgs.oci.tag
            ),
            &format!("dir:{}", dir.display()),
        ],
    );

    let mut dockerd = Dockerd::start(
        &fx.dir(&format!("{round}/docker")),
        &ctd.sock,
        &fx.mirror_url(),
    );
    for art in [&imgs.docker, &imgs.multi] {
        dockerd.pull(&format!("{}:{}", art.short(), art.tag), &diag);
    }
    dockerd.verify_unpacked(
        &format!("{}:{}", imgs.docker.short(), imgs.docker.tag),
        imgs.docker.native(),
    );
    // dockerd before its containerd.
    drop(dockerd);
    drop(ctd);
}

#[test]
fn second_round_makes_no_upstream_blob_gets() {
    let fx = Fixture::start("rounds");
    pull_round(&fx, "round1");
    let first = fx.upstream.access_log();
    for art in fx.images.all() {
        assert_upstream_served(&fx, &first, art);
    }

    pull_round(&fx, "round2");
    let all = fx.upstream.access_log();
    assert_clients_never_reached_upstream(&fx, &all);
    let second = all.since(first.len());
    if direct_mode() {
        // Harness self-check: without a cache, the counter must see the refetch.
        assert!(
            second.all_blob_gets() > 0,
            "direct mode: second round made no blob GETs? log:\n{}",
            second.dump()
        );
        eprintln!(
            "direct mode: second round made {} upstream blob GETs (expected > 0 without wharf)",
            second.all_blob_gets()
        );
        return;
    }
    assert_eq!(
        second.all_blob_gets(),
        0,
        "second round (fresh containerd, skopeo dir, fresh docker data-root) fetched blobs upstream again:\n{}\n{}",
        second.dump(),
        fx.diag()
    );
    // Inside tag_ttl (5m) tags are served with no upstream call, and digests
    // are immutable, so the manifests must not be fetched again either.
    assert_eq!(
        second.all_manifest_requests(None),
        0,
        "second round made upstream manifest requests inside tag_ttl:\n{}\n{}",
        second.dump(),
        fx.diag()
    );
    eprintln!(
        "rounds test done in {:.1?}: round 1 made {} upstream requests ({} blob GETs), round 2 made {}",
        fx.started.elapsed(),
        first.len(),
        first.all_blob_gets(),
        second.len()
    );
}
