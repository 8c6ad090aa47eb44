//! A private containerd (own root, state, sockets; CRI disabled) and `ctr`
//! helpers: pull through a hosts.toml mirror, then mount the unpacked image
//! and check its files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::images::Image;
use super::procs::{Proc, Stdout};
use super::util::{find_program, overlay_works, run, run_ok, sha256_file, CmdOutput};

pub const NAMESPACE: &str = "wharf-e2e";

pub struct Containerd {
    pub proc: Proc,
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub snapshotter: &'static str,
    ctr: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).expect("containerd dir");
        let bin = find_program("containerd");
        let ctr = find_program("ctr");
        let sock = dir.join("containerd.sock");
        assert!(
            sock.as_os_str().len() < 100,
            "socket path too long for AF_UNIX: {}",
            sock.display()
        );
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
                d = dir.display(),
                sock = sock.display()
            ),
        )
        .expect("write containerd config");
        let snapshotter = if overlay_works(dir) {
            "overlayfs"
        } else {
            "native"
        };
        let log = dir.join("containerd.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let mut proc = Proc::spawn("containerd", cmd, Stdout::File(&log), &log);
        proc.stop_grace = Duration::from_secs(10);
        let (ctr2, sock2) = (ctr.clone(), sock.clone());
        proc.wait_ready("`ctr version` to answer", Duration::from_secs(30), || {
            sock2.exists()
                && run(
                    Command::new(&ctr2)
                        .arg("--address")
                        .arg(&sock2)
                        .arg("version"),
                    Duration::from_secs(10),
                )
                .ok()
        });
        Containerd {
            proc,
            dir: dir.to_path_buf(),
            sock,
            snapshotter,
            ctr,
        }
    }

    /// `ctr --address SOCK --namespace wharf-e2e ARGS...`
    pub fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ctr);
        c.arg("--address")
            .arg(&self.sock)
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args);
        c
    }

    /// Write `DIR/docker.io/hosts.toml` sending docker.io pulls to `mirror`
    /// (`http://127.0.0.1:PORT`); returns DIR.
    pub fn write_hosts(&self, mirror: &str) -> PathBuf {
        let hosts = self.dir.join("certs.d");
        std::fs::create_dir_all(hosts.join("docker.io")).expect("hosts dir");
        std::fs::write(
            hosts.join("docker.io/hosts.toml"),
            format!(
                r#"server = "https://registry-1.docker.io"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"#
            ),
        )
        .expect("write hosts.toml");
        hosts
    }

    /// Write `DIR/<registry>/hosts.toml` sending pulls of `registry` (e.g.
    /// `quay.io`) to `mirror` (`http://127.0.0.1:PORT`), with `server` as
    /// containerd's fallback; returns DIR (`certs.d`, shared with
    /// `write_hosts`, so one DIR serves several registries).
    pub fn write_hosts_for(&self, registry: &str, server: &str, mirror: &str) -> PathBuf {
        let hosts = self.dir.join("certs.d");
        std::fs::create_dir_all(hosts.join(registry)).expect("hosts dir");
        std::fs::write(
            hosts.join(registry).join("hosts.toml"),
            format!(
                r#"server = "{server}"

[host."{mirror}"]
  capabilities = ["pull", "resolve"]
"#
            ),
        )
        .expect("write hosts.toml");
        hosts
    }

    /// `ctr images pull --hosts-dir DIR REF` (unpacks for this platform).
    pub fn pull(
        &mut self,
        hosts_dir: &Path,
        reference: &str,
        diag: &dyn Fn() -> String,
    ) -> CmdOutput {
        let hosts = hosts_dir.display().to_string();
        let mut cmd = self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            self.snapshotter,
            reference,
        ]);
        let logs = || format!("{}\n{}", diag(), self.proc.logs());
        let out = run_ok(&mut cmd, Duration::from_secs(120), &logs);
        self.proc.assert_alive();
        out
    }

    /// The digest the image record points at (`ctr images ls`).
    pub fn image_target(&self, reference: &str) -> String {
        let out = run_ok(
            &mut self.ctr(&["images", "ls"]),
            Duration::from_secs(20),
            &|| self.proc.logs(),
        );
        let text = out.stdout_str();
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&reference) {
                if let Some(d) = cols.iter().find(|c| c.starts_with("sha256:")) {
                    return d.to_string();
                }
            }
        }
        panic!("{reference} not in `ctr images ls`:\n{text}");
    }

    /// Mount the unpacked image read-only and compare its files with what the
    /// layers should produce (layer order, overwrite, whiteout, big file).
    pub fn verify_unpacked(&self, reference: &str, image: &Image) {
        let target = self
            .dir
            .join(format!("mnt-{}", reference.replace(['/', ':'], "_")));
        std::fs::create_dir_all(&target).expect("mount dir");
        let t = target.display().to_string();
        let logs = || self.proc.logs();
        run_ok(
            &mut self.ctr(&[
                "images",
                "mount",
                "--snapshotter",
                self.snapshotter,
                reference,
                &t,
            ]),
            Duration::from_secs(60),
            &logs,
        );
        let mut problems = Vec::new();
        for f in &image.files {
            match sha256_file(&target.join(&f.path)) {
                Ok((sha, size)) if sha == f.sha256 && size == f.size => {}
                Ok((sha, size)) => problems.push(format!(
                    "{}: sha256 {sha} size {size}, want {} size {}",
                    f.path, f.sha256, f.size
                )),
                Err(e) => problems.push(format!("{}: {e}", f.path)),
            }
        }
        for p in &image.absent {
            if target.join(p).symlink_metadata().is_ok() {
                problems.push(format!("{p} should have been removed by a whiteout"));
            }
        }
        let link = std::fs::read_link(target.join("etc/e2e/link"));
        if link
            .as_ref()
            .map(|l| l != Path::new("hello.txt"))
            .unwrap_or(true)
        {
            problems.push(format!("etc/e2e/link: {link:?}, want symlink to hello.txt"));
        }
        let umount = run(
            &mut self.ctr(&[
                "images",
                "unmount",
                "--snapshotter",
                self.snapshotter,
                "--rm",
                &t,
            ]),
            Duration::from_secs(60),
        );
        assert!(
            problems.is_empty(),
            "unpacked {reference} is wrong ({} snapshotter):\n{}",
            self.snapshotter,
            problems.join("\n")
        );
        assert!(
            umount.ok(),
            "ctr images unmount failed\n{}",
            umount.describe()
        );
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}
