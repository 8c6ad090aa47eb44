//! A private dockerd (own data-root, exec-root, pidfile and socket; no
//! bridge, no iptables) reusing a test containerd, with `registry-mirrors`
//! pointing at the mirror under test, and `docker` CLI helpers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::images::Image;
use super::procs::{Proc, Stdout};
use super::util::{find_program, overlay_works, run, run_ok, sha256_hex, CmdOutput};

pub struct Dockerd {
    pub proc: Proc,
    pub dir: PathBuf,
    pub sock: PathBuf,
    docker: PathBuf,
    cli_config: PathBuf,
}

impl Dockerd {
    /// `mirror` is `http://127.0.0.1:PORT`; `containerd_sock` a running containerd.
    pub fn start(dir: &Path, containerd_sock: &Path, mirror: &str) -> Dockerd {
        std::fs::create_dir_all(dir).expect("dockerd dir");
        let bin = find_program("dockerd");
        let docker = find_program("docker");
        let sock = dir.join("docker.sock");
        assert!(
            sock.as_os_str().len() < 100,
            "socket path too long for AF_UNIX: {}",
            sock.display()
        );
        let storage = if overlay_works(dir) {
            "overlay2"
        } else {
            "vfs"
        };
        let config = dir.join("daemon.json");
        let daemon = serde_json::json!({
            "data-root": dir.join("data"),
            "exec-root": dir.join("exec"),
            "pidfile": dir.join("docker.pid"),
            "hosts": [format!("unix://{}", sock.display())],
            "containerd": containerd_sock,
            "bridge": "none",
            "iptables": false,
            "ip6tables": false,
            "ip-forward": false,
            "ip-masq": false,
            "storage-driver": storage,
            "registry-mirrors": [mirror],
            "max-concurrent-downloads": 3,
            "debug": true
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&daemon).expect("json"))
            .expect("write daemon.json");
        let log = dir.join("dockerd.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--config-file").arg(&config);
        let mut proc = Proc::spawn("dockerd", cmd, Stdout::File(&log), &log);
        proc.stop_grace = Duration::from_secs(15);
        let cli_config = dir.join("cli");
        std::fs::create_dir_all(&cli_config).expect("cli config dir");
        let mut d = Dockerd {
            proc,
            dir: dir.to_path_buf(),
            sock,
            docker,
            cli_config,
        };
        let mut probe = d.cli(&["version", "--format", "{{.Server.Version}}"]);
        d.proc.wait_ready(
            "`docker version` to reach the daemon",
            Duration::from_secs(60),
            || run(&mut probe, Duration::from_secs(15)).ok(),
        );
        d
    }

    /// `docker ARGS...` against this daemon, with a private CLI config.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.docker);
        c.env("DOCKER_HOST", format!("unix://{}", self.sock.display()))
            .env("DOCKER_CONFIG", &self.cli_config)
            .args(args);
        c
    }

    pub fn pull(&mut self, name: &str, diag: &dyn Fn() -> String) -> CmdOutput {
        let logs = || format!("{}\n{}", diag(), self.proc.logs());
        let out = run_ok(
            &mut self.cli(&["pull", name]),
            Duration::from_secs(120),
            &logs,
        );
        self.proc.assert_alive();
        out
    }

    /// `docker image inspect` RepoDigests.
    pub fn repo_digests(&self, name: &str) -> Vec<String> {
        let out = run_ok(
            &mut self.cli(&[
                "image",
                "inspect",
                "--format",
                "{{json .RepoDigests}}",
                name,
            ]),
            Duration::from_secs(30),
            &|| self.proc.logs(),
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("RepoDigests of {name}: {e}: {}", out.stdout_str()))
    }

    /// Create (not start) a container from the image and copy files out of
    /// it: proves the layers were extracted in order, whiteouts applied.
    pub fn verify_unpacked(&self, name: &str, image: &Image) {
        let logs = || self.proc.logs();
        let created = run_ok(
            &mut self.cli(&["create", "--network", "none", name, "/bin/true"]),
            Duration::from_secs(60),
            &logs,
        );
        let id = created.stdout_str().trim().to_string();
        let mut problems = Vec::new();
        for f in &image.files {
            let src = format!("{id}:/{}", f.path);
            let out = run(&mut self.cli(&["cp", &src, "-"]), Duration::from_secs(60));
            if !out.ok() {
                problems.push(format!("docker cp {}: {}", f.path, out.stderr_str().trim()));
                continue;
            }
            match file_from_tar(&out.stdout) {
                Some(data) if sha256_hex(&data) == f.sha256 => {}
                Some(data) => problems.push(format!(
                    "{}: {} bytes with sha256 {}, want {} bytes {}",
                    f.path,
                    data.len(),
                    sha256_hex(&data),
                    f.size,
                    f.sha256
                )),
                None => problems.push(format!("{}: no regular file in docker cp output", f.path)),
            }
        }
        for p in &image.absent {
            let out = run(
                &mut self.cli(&["cp", &format!("{id}:/{p}"), "-"]),
                Duration::from_secs(60),
            );
            if out.ok() {
                problems.push(format!("{p} should have been removed by a whiteout"));
            }
        }
        let _ = run(&mut self.cli(&["rm", "-f", &id]), Duration::from_secs(60));
        assert!(
            problems.is_empty(),
            "docker's unpacked {name} is wrong:\n{}\n{}",
            problems.join("\n"),
            self.proc.logs()
        );
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

fn file_from_tar(data: &[u8]) -> Option<Vec<u8>> {
    let mut ar = tar::Archive::new(data);
    for entry in ar.entries().ok()? {
        let mut entry = entry.ok()?;
        if entry.header().entry_type().is_file() {
            let mut v = Vec::new();
            entry.read_to_end(&mut v).ok()?;
            return Some(v);
        }
    }
    None
}
