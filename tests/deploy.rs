//! The deployment files parse and fit together: the Kubernetes manifests
//! and compose file are valid YAML with the fields their kinds need, the
//! embedded wharf config is valid, probes point at the admin endpoints, the
//! containerd and Docker examples parse, and the Dockerfile builds the same
//! binary target the tests run and runs it as a non-root user.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document in `path`, as JSON, parsed by PyYAML (Debian's python3-yaml).
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(path)
        .output()
        .expect("/usr/bin/python3 with python3-yaml (apt-get install python3-yaml)");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn str_at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(|x| x.as_str())
        .unwrap_or_else(|| panic!("{pointer} missing in {v}"))
}

#[test]
fn kubernetes_manifests_are_complete() {
    let mut kinds = Vec::new();
    for file in [
        "configmap.yaml",
        "daemonset.yaml",
        "deployment.yaml",
        "hosts-toml.yaml",
        "fleet.yaml",
    ] {
        for doc in yaml_documents(&root().join("docker/k8s").join(file)) {
            let kind = str_at(&doc, "/kind").to_string();
            assert!(!str_at(&doc, "/apiVersion").is_empty());
            assert!(!str_at(&doc, "/metadata/name").is_empty());
            if kind == "DaemonSet" || kind == "Deployment" {
                let spec = &doc["spec"];
                assert_eq!(
                    spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"],
                    "{file}: selector must match the pod labels"
                );
                let pod = &spec["template"]["spec"];
                assert_ne!(
                    pod["securityContext"]["runAsUser"], 0,
                    "{file}: runs as root"
                );
                let c = &pod["containers"][0];
                assert!(!str_at(c, "/image").is_empty());
                assert_eq!(str_at(c, "/readinessProbe/httpGet/path"), "/readyz");
                assert_eq!(str_at(c, "/livenessProbe/httpGet/path"), "/healthz");
                assert!(
                    c["resources"]["requests"]["memory"].is_string(),
                    "{file}: resource requests"
                );
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a.as_str())
                    .collect();
                assert_eq!(args[0], "serve");
                let mounts = c["volumeMounts"].as_array().unwrap();
                assert!(
                    mounts.iter().any(|m| m["mountPath"] == "/var/lib/wharf"),
                    "{file}: data volume"
                );
                assert!(
                    mounts.iter().any(|m| m["mountPath"] == "/etc/wharf"),
                    "{file}: config volume"
                );
                assert_eq!(
                    str_at(
                        &spec["template"],
                        "/metadata/annotations/prometheus.io~1path"
                    ),
                    "/metrics"
                );
            }
            if file == "fleet.yaml" && kind == "ConfigMap" {
                let config = wharf::config::Config::from_toml_str(str_at(&doc, "/data/wharf.toml"))
                    .unwrap_or_else(|e| panic!("fleet ConfigMap wharf.toml: {e}"));
                let s3 = config.storage.s3.expect("the fleet shares a bucket");
                assert!(s3.lease, "one upstream fetch per fleet");
                assert_eq!(config.storage.dir, Path::new("/var/lib/wharf"));
                assert!(config.server.admin_listen.ip().is_unspecified());
            }
            if file == "configmap.yaml" {
                let config = wharf::config::Config::from_toml_str(str_at(&doc, "/data/wharf.toml"))
                    .unwrap_or_else(|e| panic!("ConfigMap wharf.toml: {e}"));
                assert_eq!(
                    config.storage.dir,
                    Path::new("/var/lib/wharf"),
                    "the volume is the data dir"
                );
                assert_eq!(
                    config.server.admin_listen.port(),
                    9090,
                    "probes use port 9090"
                );
                assert!(
                    config.server.admin_listen.ip().is_unspecified(),
                    "kubelet probes come from outside the pod"
                );
            }
            if file == "hosts-toml.yaml" {
                for (name, text) in doc["data"].as_object().unwrap() {
                    let hosts: toml::Table = text
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert!(
                        hosts["server"].as_str().unwrap().starts_with("https://"),
                        "{name}"
                    );
                    assert!(
                        hosts["host"]
                            .as_table()
                            .unwrap()
                            .contains_key("http://127.0.0.1:5000"),
                        "{name}"
                    );
                }
            }
            kinds.push(kind);
        }
    }
    for kind in [
        "DaemonSet",
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} among {kinds:?}");
    }
}

#[test]
fn compose_file_builds_the_dockerfile_and_mounts_the_config() {
    let docs = yaml_documents(&root().join("docker/compose.yaml"));
    let wharf = &docs[0]["services"]["wharf"];
    let context = root().join("docker").join(str_at(wharf, "/build/context"));
    assert!(context.join(str_at(wharf, "/build/dockerfile")).is_file());
    let volumes: Vec<&str> = wharf["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let config_mount = volumes
        .iter()
        .find(|v| v.contains("/etc/wharf/wharf.toml"))
        .expect("config mount");
    let host_side = config_mount.split(':').next().unwrap();
    assert!(
        root().join("docker").join(host_side).is_file(),
        "{host_side} does not exist"
    );
    assert!(volumes.iter().any(|v| v.starts_with("wharf-data:")));
}

#[test]
fn dockerfile_builds_this_binary_and_runs_it_unprivileged() {
    let text = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    let instructions: Vec<(String, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .fold(Vec::<String>::new(), |mut acc, line| {
            // Join continuation lines.
            match acc.last_mut() {
                Some(prev) if prev.ends_with('\\') => {
                    prev.pop();
                    prev.push(' ');
                    prev.push_str(line);
                }
                _ => acc.push(line.to_string()),
            }
            acc
        })
        .into_iter()
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((&l, ""));
            (op.to_uppercase(), rest.trim().to_string())
        })
        .collect();
    let known = [
        "FROM",
        "WORKDIR",
        "COPY",
        "RUN",
        "USER",
        "VOLUME",
        "EXPOSE",
        "ENV",
        "ENTRYPOINT",
        "CMD",
    ];
    for (op, _) in &instructions {
        assert!(known.contains(&op.as_str()), "unexpected instruction {op}");
    }
    let stages: Vec<&String> = instructions
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "multi-stage: a build stage and a runtime stage"
    );
    assert!(stages[0].ends_with("AS build"));
    let build = instructions
        .iter()
        .find(|(op, r)| op == "RUN" && r.contains("cargo build"))
        .expect("cargo build");
    assert!(
        build.1.contains("--release")
            && build.1.contains("--locked")
            && build.1.contains("--bin wharf")
    );
    let copy = instructions
        .iter()
        .find(|(op, r)| op == "COPY" && r.starts_with("--from=build"))
        .expect("COPY --from=build");
    // The binary the image ships is the one `cargo build --release` makes,
    // the same target this test suite runs (under `cargo test --release`).
    assert!(copy.1.contains("/src/target/release/wharf"));
    let tested = Path::new(env!("CARGO_BIN_EXE_wharf"));
    assert!(tested.ends_with("wharf") && tested.is_file());
    let user = instructions
        .iter()
        .rev()
        .find(|(op, _)| op == "USER")
        .expect("USER");
    assert_ne!(user.1, "0");
    assert_ne!(user.1, "root");
    // Every file the build stage copies exists in the repository.
    for (op, rest) in &instructions {
        if op == "COPY" && !rest.starts_with("--from") {
            for src in rest.split_whitespace().rev().skip(1) {
                assert!(
                    root().join(src).exists(),
                    "COPY {src}: not in the repository"
                );
            }
        }
    }
    let entry = instructions
        .iter()
        .find(|(op, _)| op == "ENTRYPOINT")
        .unwrap();
    let entry: Vec<String> = serde_json::from_str(&entry.1).expect("ENTRYPOINT in exec form");
    assert_eq!(entry, ["/usr/local/bin/wharf"]);
    let cmd: Vec<String> =
        serde_json::from_str(&instructions.iter().find(|(op, _)| op == "CMD").unwrap().1).unwrap();
    let out = Command::new(tested)
        .args(&cmd)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CMD {cmd:?} is not a valid wharf command line"
    );
}

#[test]
fn client_examples_parse_and_point_at_wharf() {
    for registry in [
        "docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "_default",
    ] {
        let path = root()
            .join("config/containerd/certs.d")
            .join(registry)
            .join("hosts.toml");
        let hosts: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let host = &hosts["host"]["http://127.0.0.1:5000"];
        let caps: Vec<&str> = host["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert_eq!(caps, ["pull", "resolve"], "{registry}");
        if registry != "_default" {
            assert!(
                hosts["server"].as_str().unwrap().starts_with("https://"),
                "{registry}"
            );
        }
    }
    let daemon: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("config/docker/daemon.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(daemon["registry-mirrors"][0], "http://127.0.0.1:5000");
}
