//! Long-running child processes (registries, wharf, containerd, dockerd).
//! A `Proc` is killed when dropped, also while a test panics: SIGTERM, a
//! grace period, then SIGKILL, always by its own PID. PR_SET_PDEATHSIG makes
//! the kernel send SIGTERM if the test process dies without unwinding.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::util::{child_path, tail, SETUP_HINT};

pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout_log: Option<PathBuf>,
    pub stderr_log: PathBuf,
    pub stop_grace: Duration,
}

pub enum Stdout<'a> {
    /// Append stdout to this file (may be the same path as the stderr log).
    File(&'a Path),
    /// Leave a pipe for the caller to take with `take_stdout`.
    Piped,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, stdout: Stdout<'_>, stderr_log: &Path) -> Proc {
        let err_file = File::create(stderr_log)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_log.display()));
        let stdout_log = match stdout {
            Stdout::File(p) if p == stderr_log => {
                cmd.stdout(err_file.try_clone().expect("dup log fd"));
                Some(p.to_path_buf())
            }
            Stdout::File(p) => {
                let f = File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                cmd.stdout(f);
                Some(p.to_path_buf())
            }
            Stdout::Piped => {
                cmd.stdout(Stdio::piped());
                None
            }
        };
        cmd.stderr(err_file)
            .stdin(Stdio::null())
            .env("PATH", child_path());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}; {SETUP_HINT}"));
        Proc {
            name: name.to_string(),
            child,
            stdout_log,
            stderr_log: stderr_log.to_path_buf(),
            stop_grace: Duration::from_secs(5),
        }
    }

    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Log tails for panic messages.
    pub fn logs(&self) -> String {
        let mut s = format!(
            "=== {} (pid {}) ===\n{}",
            self.name,
            self.child.id(),
            tail(&self.stderr_log, 60)
        );
        if let Some(out) = &self.stdout_log {
            if out != &self.stderr_log {
                s.push('\n');
                s.push_str(&tail(out, 20));
            }
        }
        s
    }

    /// Poll `cond` until it holds; panics with the log tail on timeout or if
    /// the process exits first.
    pub fn wait_ready(&mut self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if cond() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before {what}\n{}",
                    self.name,
                    self.logs()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {}: {what}\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panic (with logs) if the process has died.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.exited() {
            panic!("{} died ({status})\n{}", self.name, self.logs());
        }
    }

    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by PID; it has not been reaped yet
        // (try_wait returned None), so the PID cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < self.stop_grace {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
