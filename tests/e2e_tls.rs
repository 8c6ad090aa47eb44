//! containerd pulling through wharf's TLS listener: `ctr images pull` with a
//! hosts.toml whose `https://` mirror host names the test CA (`ca = PATH`)
//! gets the image through wharf; without `ca` the mirror's certificate is
//! not trusted and the pull fails (the fallback `server`, Docker Hub, is
//! unreachable here). Harness: tests/real (see tests/real/README.md).
//!
//! Run: `cargo test --release --test e2e_tls` (as root).

mod real;

use std::path::{Path, PathBuf};
use std::time::Duration;

use real::containerd::Containerd;
use real::util::run;
use real::wharf::{TlsFiles, WharfOpts};
use real::{direct_mode, Fixture};

/// `DIR/docker.io/hosts.toml`: docker.io through `mirror`, trusting `ca` if
/// given, falling back to the (unreachable) Hub; returns DIR.
fn write_hosts(dir: &Path, mirror: &str, ca: Option<&Path>) -> PathBuf {
    std::fs::create_dir_all(dir.join("docker.io")).expect("hosts dir");
    let ca = ca
        .map(|p| format!("  ca = \"{}\"\n", p.display()))
        .unwrap_or_default();
    std::fs::write(
        dir.join("docker.io/hosts.toml"),
        format!(
            r#"server = "https://registry-1.docker.io"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
{ca}"#
        ),
    )
    .expect("write hosts.toml");
    dir.to_path_buf()
}

#[test]
fn containerd_pulls_through_an_https_mirror_with_ca() {
    if direct_mode() {
        eprintln!("WHARF_E2E_DIRECT=1: the TLS test needs wharf; nothing to check");
        return;
    }
    // The certificates outlive the fixture (declared first, dropped last).
    let mut certs = tempfile::Builder::new()
        .prefix("wharf-e2e-tls-certs-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    if std::env::var("WHARF_E2E_KEEP").is_ok_and(|v| v == "1") {
        certs.disable_cleanup(true);
    }
    let tls = TlsFiles::generate(certs.path());
    let opts = WharfOpts {
        tls: Some(tls.clone()),
        ..WharfOpts::default()
    };
    let fx = Fixture::start_with("tls", &opts);
    let mirror = fx.mirror_url();
    assert!(mirror.starts_with("https://127.0.0.1:"), "{mirror}");
    let mut ctd = Containerd::start(&fx.dir("containerd"));
    let art = &fx.images.multi;
    let reference = art.docker_io_ref();

    // Without `ca`: containerd does not trust wharf's certificate, falls
    // back to the unreachable Hub, and the pull fails; nothing reached the
    // upstream for this repository.
    let untrusted = write_hosts(&fx.dir("certs.d-no-ca"), &mirror, None);
    let hosts = untrusted.display().to_string();
    let before = fx.upstream.access_log().len();
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
    let since = fx.upstream.access_log().since(before);
    assert!(
        !out.ok(),
        "ctr pulled {reference} through {mirror} without trusting its CA\n{}\n{}\n{}",
        out.describe(),
        fx.diag(),
        ctd.logs()
    );
    let text = format!("{}{}", out.stdout_str(), out.stderr_str());
    eprintln!(
        "untrusted pull failed as expected: {}",
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    );
    assert!(
        text.contains("certificate"),
        "the untrusted pull failed, but not on the certificate:\n{}\n{}",
        out.describe(),
        fx.diag()
    );
    let touched = since.count(|e| e.path.starts_with(&format!("/v2/{}/", art.repo)));
    assert_eq!(
        touched,
        0,
        "the untrusted pull reached the upstream:\n{}",
        since.dump()
    );
    ctd.proc.assert_alive();

    // With `ca`: the pull goes through wharf over TLS and unpacks.
    let trusted = write_hosts(&fx.dir("certs.d"), &mirror, Some(&tls.ca));
    ctd.pull(&trusted, &reference, &|| fx.diag());
    assert_eq!(
        ctd.image_target(&reference),
        art.top.digest,
        "containerd resolved {reference} to another digest"
    );
    ctd.verify_unpacked(&reference, art.native());

    // Every blob came from the upstream (only wharf can reach it), and the
    // client never talked to the upstream itself.
    let log = fx.upstream.access_log();
    for blob in art.native().blobs() {
        assert!(
            log.blob_gets_ok(&art.repo, &blob.digest) >= 1,
            "upstream never served blob {} of {reference}, so containerd did not get it through {mirror}\n{}\n{}",
            blob.digest,
            log.dump(),
            fx.diag()
        );
    }
    let direct = log.count(|e| e.user_agent.contains("containerd/"));
    assert_eq!(
        direct,
        0,
        "containerd talked to the upstream directly:\n{}",
        log.dump()
    );
    eprintln!(
        "TLS containerd test done in {:.1?} ({} upstream requests)",
        fx.started.elapsed(),
        log.len()
    );
}
