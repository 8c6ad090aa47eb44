//! Small helpers shared by the real-program e2e harness: finding programs,
//! running commands with timeouts, log tails, polling, and a dependency-free
//! HTTP probe for readiness checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const SETUP_HINT: &str =
    "the real-program e2e suite needs Debian's packages: run `.ci/run` or \
     `apt-get update && apt-get install -y docker-registry containerd docker.io skopeo openssl apache2-utils`, \
     and run the tests as root";

/// PATH handed to every child: dockerd needs to find containerd, runc and
/// docker-init, which live in sbin directories a test runner's PATH may lack.
pub fn child_path() -> String {
    let mut p = String::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    if let Ok(existing) = std::env::var("PATH") {
        p.push(':');
        p.push_str(&existing);
    }
    p
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Absolute path of a required program, or a panic that says how to install it.
pub fn find_program(name: &str) -> PathBuf {
    for dir in std::env::split_paths(&child_path()) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!("required program `{name}` was not found in PATH or the sbin directories; {SETUP_HINT}");
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "containerd unpacking and dockerd need root (euid is {euid}); {SETUP_HINT}"
    );
}

/// The last `max_lines` lines of a log file, labelled, for panic messages.
pub fn tail(path: &Path, max_lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(max_lines);
            let mut body = lines[start..].join("\n");
            // Keep panic messages readable even when a log line is huge.
            if body.len() > 12_000 {
                let cut = body.len() - 12_000;
                let cut = (cut..body.len())
                    .find(|i| body.is_char_boundary(*i))
                    .unwrap_or(0);
                body = format!("...{}", &body[cut..]);
            }
            format!(
                "----- last {} lines of {} -----\n{}\n-----",
                lines.len() - start,
                path.display(),
                body
            )
        }
        Err(e) => format!("----- (cannot read {}: {e}) -----", path.display()),
    }
}

pub struct CmdOutput {
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl CmdOutput {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn describe(&self) -> String {
        let out = self.stdout_str();
        let out = if out.len() > 6000 {
            format!("...{}", &out[out.len() - 6000..])
        } else {
            out
        };
        format!(
            "command: {}\nstatus: {} after {:.1?}\nstdout:\n{}\nstderr:\n{}",
            self.desc,
            self.status,
            self.elapsed,
            out,
            self.stderr_str()
        )
    }
}

/// Run a command to completion with a hard timeout. Stdout and stderr are
/// captured; a timeout kills the command and panics with what it printed.
pub fn run(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let desc = format!("{cmd:?}");
    cmd.env("PATH", child_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}; {SETUP_HINT}"));
    let mut so = child.stdout.take().expect("piped stdout");
    let mut se = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let status = child.wait().expect("wait after kill");
            let out = CmdOutput {
                desc,
                status,
                stdout: t_out.join().unwrap_or_default(),
                stderr: t_err.join().unwrap_or_default(),
                elapsed: start.elapsed(),
            };
            panic!("TIMED OUT after {timeout:?} (killed)\n{}", out.describe());
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    CmdOutput {
        desc,
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// `run`, then panic (with `diag()` appended: log tails of the daemons
/// involved) unless the command exited 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration, diag: &dyn Fn() -> String) -> CmdOutput {
    let out = run(cmd, timeout);
    if !out.ok() {
        panic!("command failed\n{}\n\n{}", out.describe(), diag());
    }
    out
}

/// Poll `cond` until it holds or `timeout` passes; on timeout panic with `diag()`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    diag: &dyn Fn() -> String,
) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", diag());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Status code of `GET path` on `addr` (host:port), or None if the server
/// is not answering yet. HTTP/1.0 with Connection: close keeps it trivial.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let sock: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).ok()?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = std::str::from_utf8(&buf[..got]).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n_total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// Overlay mounts work on most hosts but not inside every sandbox; probe once
/// so containerd and dockerd can fall back to native / vfs.
pub fn overlay_works(scratch: &Path) -> bool {
    if let Ok(v) = std::env::var("WHARF_E2E_OVERLAY") {
        return v == "1";
    }
    let base = scratch.join("overlay-probe");
    let dirs = ["l", "u", "w", "m"].map(|d| base.join(d));
    for d in &dirs {
        if std::fs::create_dir_all(d).is_err() {
            return false;
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        dirs[0].display(),
        dirs[1].display(),
        dirs[2].display()
    );
    let mounted = Command::new("mount")
        .env("PATH", child_path())
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&dirs[3])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        let _ = Command::new("umount")
            .env("PATH", child_path())
            .arg(&dirs[3])
            .status();
    }
    let _ = std::fs::remove_dir_all(&base);
    mounted
}

/// Lazily unmount anything still mounted under `dir` (snapshot or image
/// mounts left behind by a failed test), deepest first, so the temp dir can
/// be removed.
pub fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|t| t.replace("\\040", " "))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = Command::new("umount")
            .env("PATH", child_path())
            .args(["-l", &t])
            .status();
    }
}

/// `find_program` for a program outside the packages `SETUP_HINT` lists:
/// a missing one panics naming the Debian package that provides it.
pub fn find_program_from(name: &str, package: &str) -> PathBuf {
    for dir in std::env::split_paths(&child_path()) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    panic!(
        "required program `{name}` was not found in PATH or the sbin directories: \
         install Debian's `{package}` package (`apt-get install -y {package}`, \
         which tests/run.sh does); {SETUP_HINT}"
    );
}

/// `http://127.0.0.1:PORT` where nothing listens (the port was free a
/// moment ago): a containerd fallback `server` that refuses connections,
/// so a client cannot go around the mirror under test.
pub fn refusing_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("local addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}
