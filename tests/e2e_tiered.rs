//! Tiered caches with real programs: containerd (`ctr images pull`, a
//! hosts.toml mirror whose fallback `server` refuses connections) → a
//! node-local wharf → a regional wharf → the token-auth docker-registry of
//! tests/real. The node wharves' `[[upstream]]` URLs point at the regional
//! wharf; nothing else is configured for the tiering. In order, with the
//! same processes throughout:
//!
//! 1. containerd pulls `docker.io/library/e2e-multi:1` through node N1 and
//!    unpacks it; the registry served every blob, to the regional wharf only.
//! 2. A second node N2 (own data dir) with a fresh containerd pulls the same
//!    image: the registry gets zero requests (and the token server none), the
//!    regional wharf answers every request from its cache (`outcome=hit`).
//! 3. `ns` passes through the chain: `quay.io/library/e2e-oci:1` through N1
//!    (hosts.toml for quay.io) is logged by N1 and by the regional wharf with
//!    `upstream=quay.io`, and reaches the registry with `?ns=quay.io`.
//! 4. Tags and TTLs: N1 has `tag_ttl = "1s"`, the regional wharf `"5m"`. A
//!    re-pull after more than 1 s makes N1 revalidate the tag with a HEAD the
//!    regional wharf answers from cache; the registry sees nothing.
//!
//! Run: `cargo test --release --test e2e_tiered` (as root, with the packages
//! of tests/real/README.md).

mod real;

use std::time::{Duration, Instant};

use real::containerd::Containerd;
use real::images::Artifact;
use real::upstream::AccessLog;
use real::util::{find_program, refusing_url};
use real::wharf::{RequestLine, Wharf, WharfOpts};
use real::{direct_mode, Fixture};

const NODE_TTL: &str = "1s";
const REGIONAL_TTL: &str = "5m";

/// `[[upstream]]` table for quay.io at `url`.
fn quay_upstream(url: &str) -> String {
    format!("[[upstream]]\nname = \"quay.io\"\nurl = \"{url}\"\n")
}

fn dump(lines: &[&RequestLine]) -> String {
    lines
        .iter()
        .map(|l| l.line.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Request lines for repository `repo`.
fn for_repo<'a>(lines: &'a [RequestLine], repo: &str) -> Vec<&'a RequestLine> {
    lines.iter().filter(|l| l.name() == repo).collect()
}

/// The lines for `reference` (a tag or digest) answered 200.
fn served<'a>(lines: &[&'a RequestLine], reference: &str) -> Vec<&'a RequestLine> {
    lines
        .iter()
        .copied()
        .filter(|l| l.reference() == reference && l.status() == 200)
        .collect()
}

/// Every blob and manifest of this platform's image of `art` (and the tag)
/// was answered 200 in `lines`, each time with an outcome in `outcomes`.
fn assert_served_all(
    who: &str,
    lines: &[&RequestLine],
    art: &Artifact,
    outcomes: &[&str],
    diag: &dyn Fn() -> String,
) {
    let img = art.native();
    let mut refs: Vec<&str> = vec![art.tag.as_str()];
    refs.extend(img.blobs().map(|b| b.digest.as_str()));
    if art.is_index() {
        refs.push(img.manifest.digest.as_str());
    }
    for r in refs {
        let got = served(lines, r);
        assert!(
            !got.is_empty() && got.iter().all(|l| outcomes.contains(&l.outcome())),
            "{who}: want {}@{r} answered 200 with outcome in {outcomes:?}; its request lines:\n{}\n{}",
            art.repo,
            dump(lines),
            diag()
        );
    }
}

/// All of `lines` name upstream `name`.
fn assert_upstream(who: &str, lines: &[&RequestLine], name: &str, diag: &dyn Fn() -> String) {
    assert!(
        !lines.is_empty() && lines.iter().all(|l| l.upstream() == name),
        "{who}: want request lines, all with upstream={name}:\n{}\n{}",
        dump(lines),
        diag()
    );
}

/// Registry requests for `/v2/<repo>/...`.
fn registry_touches(log: &AccessLog, repo: &str) -> AccessLog {
    let prefix = format!("/v2/{repo}/");
    AccessLog {
        entries: log
            .entries
            .iter()
            .filter(|e| e.path.starts_with(&prefix))
            .cloned()
            .collect(),
    }
}

/// Only wharf talks to the registry: containerd's requests all go to its
/// mirror (its fallback refuses connections).
fn assert_no_client_at_registry(log: &AccessLog, diag: &dyn Fn() -> String) {
    assert_eq!(
        log.count(|e| e.user_agent.contains("containerd")),
        0,
        "containerd reached the registry directly:\n{}\n{}",
        log.dump(),
        diag()
    );
}

fn summary(lines: &[&RequestLine]) -> String {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for l in lines {
        *counts
            .entry(format!(
                "{} upstream={} status={} outcome={}",
                l.method(),
                l.upstream(),
                l.status(),
                l.outcome()
            ))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(k, n)| format!("{n}x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn node_wharf_pulls_through_regional_wharf() {
    if direct_mode() {
        eprintln!("WHARF_E2E_DIRECT=1: the tiered test needs wharf; nothing to check");
        return;
    }
    for p in ["containerd", "ctr"] {
        find_program(p);
    }
    let mut fx = Fixture::start("tiered");
    // The regional tier R: docker.io (default) and quay.io both at the
    // token-auth registry. It replaces the fixture's single-upstream wharf.
    let registry = fx.upstream.authed.url();
    fx.wharf = None;
    fx.wharf = Some(Wharf::start_with(
        &fx.dir("regional"),
        &registry,
        &WharfOpts {
            tag_ttl: REGIONAL_TTL.into(),
            extra_toml: quay_upstream(&registry),
            ..WharfOpts::default()
        },
    ));
    let r = fx.wharf.as_ref().expect("regional wharf");
    let r_url = r.url();
    // Node tiers: same names, every URL the regional wharf.
    let n1 = Wharf::start_with(
        &fx.dir("node1"),
        &r_url,
        &WharfOpts {
            tag_ttl: NODE_TTL.into(),
            extra_toml: quay_upstream(&r_url),
            ..WharfOpts::default()
        },
    );
    let n2 = Wharf::start_with(
        &fx.dir("node2"),
        &r_url,
        &WharfOpts {
            tag_ttl: REGIONAL_TTL.into(),
            ..WharfOpts::default()
        },
    );
    let diag = || {
        format!(
            "=== regional wharf R and registry ===\n{}\n=== node N1 ===\n{}\n=== node N2 ===\n{}",
            fx.diag(),
            n1.logs(),
            n2.logs()
        )
    };
    let imgs = fx.images;
    let multi = &imgs.multi;
    let oci = &imgs.oci;
    let fallback = refusing_url();
    eprintln!(
        "[tiered] R {} (tag_ttl {REGIONAL_TTL}), N1 {} (tag_ttl {NODE_TTL}), N2 {}, registry {registry}, fallback {fallback} (refuses) at {:.1?}",
        r.addr,
        n1.addr,
        n2.addr,
        fx.started.elapsed()
    );

    // 1. containerd → N1 → R → registry.
    let reg0 = fx.upstream.access_log().len();
    let (r0, n1_0) = (r.log_mark(), n1.log_mark());
    let mut c1 = Containerd::start(&fx.dir("c1"));
    let hosts1 = c1.write_hosts_for("docker.io", &fallback, &n1.url());
    c1.write_hosts_for("quay.io", &fallback, &n1.url());
    let multi_ref = multi.docker_io_ref();
    c1.pull(&hosts1, &multi_ref, &diag);
    let step1_done = Instant::now();
    assert_eq!(
        c1.image_target(&multi_ref),
        multi.top.digest,
        "containerd resolved {multi_ref} to another digest"
    );
    c1.verify_unpacked(&multi_ref, multi.native());
    let reg = fx.upstream.access_log().since(reg0);
    assert_no_client_at_registry(&reg, &diag);
    for blob in multi.native().blobs() {
        assert_eq!(
            reg.blob_gets_ok(&multi.repo, &blob.digest),
            1,
            "step 1: registry should have served blob {} of {} exactly once (to R):\n{}\n{}",
            blob.digest,
            multi.repo,
            reg.dump(),
            diag()
        );
    }
    for other in multi.foreign() {
        for blob in other.blobs() {
            assert_eq!(
                reg.blob_gets(&multi.repo, &blob.digest),
                0,
                "step 1: {} blob {} fetched though nobody asked:\n{}",
                other.arch,
                blob.digest,
                reg.dump()
            );
        }
    }
    // R's own upstream is on 127.0.0.1, not docker.io's host: it sends ns.
    let touches = registry_touches(&reg, &multi.repo);
    assert!(
        !touches.entries.is_empty() && touches.entries.iter().all(|e| e.query == "ns=docker.io"),
        "step 1: R's requests to the registry should carry ?ns=docker.io:\n{}",
        touches.dump()
    );
    let r_lines = r.requests_since(r0);
    let r_multi = for_repo(&r_lines, &multi.repo);
    assert_upstream("step 1, R", &r_multi, "docker.io", &diag);
    assert_served_all("step 1, R", &r_multi, multi, &["miss", "fill"], &diag);
    let n1_lines = n1.requests_since(n1_0);
    let n1_multi = for_repo(&n1_lines, &multi.repo);
    assert_upstream("step 1, N1", &n1_multi, "docker.io", &diag);
    assert_served_all("step 1, N1", &n1_multi, multi, &["miss", "fill"], &diag);
    eprintln!(
        "[tiered] 1. N1 pull done at {:.1?}: registry {} requests; R logged {}; N1 logged {}",
        fx.started.elapsed(),
        reg.len(),
        summary(&r_multi),
        summary(&n1_multi)
    );

    // 2. A second node, fresh containerd: everything from R's cache.
    let reg1 = fx.upstream.access_log().len();
    let tokens1 = fx.upstream.token.requests();
    let (r1, n2_0) = (r.log_mark(), n2.log_mark());
    let mut c2 = Containerd::start(&fx.dir("c2"));
    let hosts2 = c2.write_hosts_for("docker.io", &fallback, &n2.url());
    c2.pull(&hosts2, &multi_ref, &diag);
    assert_eq!(c2.image_target(&multi_ref), multi.top.digest);
    c2.verify_unpacked(&multi_ref, multi.native());
    let reg = fx.upstream.access_log().since(reg1);
    assert_eq!(
        reg.len(),
        0,
        "step 2: the registry got requests while N2 pulled through R's warm cache:\n{}\n{}",
        reg.dump(),
        diag()
    );
    assert_eq!(
        fx.upstream.token.requests(),
        tokens1,
        "step 2: the token server was asked while N2 pulled through R's warm cache"
    );
    let r_lines = r.requests_since(r1);
    let r_multi = for_repo(&r_lines, &multi.repo);
    assert_upstream("step 2, R", &r_multi, "docker.io", &diag);
    assert!(
        r_multi.iter().all(|l| l.outcome() == "hit"),
        "step 2: R should answer N2 from cache only (outcome=hit):\n{}\n{}",
        dump(&r_multi),
        diag()
    );
    assert_served_all("step 2, R", &r_multi, multi, &["hit"], &diag);
    let n2_lines = n2.requests_since(n2_0);
    let n2_multi = for_repo(&n2_lines, &multi.repo);
    assert_served_all("step 2, N2", &n2_multi, multi, &["miss", "fill"], &diag);
    eprintln!(
        "[tiered] 2. N2 pull done at {:.1?}: registry 0 requests; R logged {}; N2 logged {}",
        fx.started.elapsed(),
        summary(&r_multi),
        summary(&n2_multi)
    );

    // 3. quay.io: containerd's ?ns=quay.io routes N1 to its quay.io upstream,
    //    whose ?ns=quay.io routes R to its own.
    let reg2 = fx.upstream.access_log().len();
    let (r2, n1_2) = (r.log_mark(), n1.log_mark());
    let quay_ref = format!("quay.io/{}:{}", oci.repo, oci.tag);
    c1.pull(&hosts1, &quay_ref, &diag);
    assert_eq!(c1.image_target(&quay_ref), oci.top.digest);
    c1.verify_unpacked(&quay_ref, oci.native());
    let reg = fx.upstream.access_log().since(reg2);
    assert_no_client_at_registry(&reg, &diag);
    let touches = registry_touches(&reg, &oci.repo);
    assert!(
        !touches.entries.is_empty() && touches.entries.iter().all(|e| e.query == "ns=quay.io"),
        "step 3: R's requests to the registry for {} should carry ?ns=quay.io:\n{}\n{}",
        oci.repo,
        reg.dump(),
        diag()
    );
    for blob in oci.native().blobs() {
        assert_eq!(
            reg.blob_gets_ok(&oci.repo, &blob.digest),
            1,
            "step 3: registry should have served blob {} of {} once (to R's quay.io upstream):\n{}",
            blob.digest,
            oci.repo,
            reg.dump()
        );
    }
    let r_lines = r.requests_since(r2);
    let r_oci = for_repo(&r_lines, &oci.repo);
    assert_upstream("step 3, R", &r_oci, "quay.io", &diag);
    assert_served_all("step 3, R", &r_oci, oci, &["miss", "fill"], &diag);
    let n1_lines = n1.requests_since(n1_2);
    let n1_oci = for_repo(&n1_lines, &oci.repo);
    assert_upstream("step 3, N1", &n1_oci, "quay.io", &diag);
    assert_served_all("step 3, N1", &n1_oci, oci, &["miss", "fill"], &diag);
    eprintln!(
        "[tiered] 3. quay.io pull done at {:.1?}: registry {} requests (all ?ns=quay.io); R logged {}; N1 logged {}",
        fx.started.elapsed(),
        reg.len(),
        summary(&r_oci),
        summary(&n1_oci)
    );

    // 4. N1's tag is older than its 1 s TTL, R's is inside its 5 min: the
    //    re-pull revalidates at R with a HEAD, R answers from cache.
    let wait = Duration::from_millis(1300).saturating_sub(step1_done.elapsed());
    std::thread::sleep(wait);
    let reg3 = fx.upstream.access_log().len();
    let (r3, n1_3) = (r.log_mark(), n1.log_mark());
    c1.pull(&hosts1, &multi_ref, &diag);
    assert_eq!(c1.image_target(&multi_ref), multi.top.digest);
    let reg = fx.upstream.access_log().since(reg3);
    assert_eq!(
        reg.len(),
        0,
        "step 4: the registry got requests while R's tag was inside its TTL:\n{}\n{}",
        reg.dump(),
        diag()
    );
    let n1_lines = n1.requests_since(n1_3);
    let n1_tag: Vec<&RequestLine> = for_repo(&n1_lines, &multi.repo)
        .into_iter()
        .filter(|l| l.reference() == multi.tag)
        .collect();
    assert!(
        !n1_tag.is_empty()
            && n1_tag
                .iter()
                .all(|l| l.status() == 200 && l.outcome() == "revalidated"),
        "step 4: N1 should have revalidated {}:{} (outcome=revalidated):\n{}\n{}",
        multi.repo,
        multi.tag,
        dump(&n1_tag),
        diag()
    );
    let r_lines = r.requests_since(r3);
    let r_multi = for_repo(&r_lines, &multi.repo);
    let r_heads: Vec<&RequestLine> = r_multi
        .iter()
        .copied()
        .filter(|l| l.method() == "HEAD" && l.reference() == multi.tag)
        .collect();
    assert!(
        !r_heads.is_empty()
            && r_multi
                .iter()
                .all(|l| l.status() == 200 && l.outcome() == "hit" && l.upstream() == "docker.io"),
        "step 4: R should see a HEAD for {}:{} and answer everything from cache:\n{}\n{}",
        multi.repo,
        multi.tag,
        dump(&r_multi),
        diag()
    );
    eprintln!(
        "[tiered] 4. re-pull after {:.1?} done at {:.1?}: registry 0 requests; R logged {}; N1 logged {}",
        step1_done.elapsed(),
        fx.started.elapsed(),
        summary(&r_multi),
        summary(&for_repo(&n1_lines, &multi.repo))
    );

    // containerd before the wharves and the fixture.
    drop(c2);
    drop(c1);
    fx.assert_wharf_alive();
    eprintln!("[tiered] done in {:.1?}", fx.started.elapsed());
}
