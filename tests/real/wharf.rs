//! Starts the wharf binary under test with a config file we write, and
//! waits for its one stdout line `wharf listening on 127.0.0.1:PORT`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::procs::{Proc, Stdout};

pub struct Wharf {
    pub proc: Proc,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    /// The CA to trust when wharf serves TLS.
    pub tls_ca: Option<PathBuf>,
}

/// The binary cargo built for this test run, or `WHARF_E2E_BIN` to test
/// another build (e.g. an installed one).
pub fn binary() -> PathBuf {
    match std::env::var_os("WHARF_E2E_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_wharf")),
    }
}

/// Knobs for the config `Wharf::start_with` writes.
#[derive(Clone, Debug)]
pub struct WharfOpts {
    pub tag_ttl: String,
    /// `[storage] max_size`, e.g. "8MiB" or "9000000B"; wharf's default if None.
    pub max_size: Option<String>,
    /// Extra lines for the `docker.io` `[[upstream]]` table, e.g.
    /// `connect_timeout = "2s"`.
    pub upstream_extra: String,
    /// Appended verbatim at the end (more `[[upstream]]` tables).
    pub extra_toml: String,
    /// Serve the API over TLS (`[server] tls_cert`/`tls_key`); readiness is
    /// then probed over HTTPS trusting `ca`.
    pub tls: Option<TlsFiles>,
}

/// PEM files for wharf's TLS listener and the CA that signed its certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// A fresh test CA (`ca.crt`) and a server certificate for IP 127.0.0.1
    /// and DNS localhost signed by it (`server.crt`, `server.key`) in `dir`,
    /// made with the `openssl` CLI.
    pub fn generate(dir: &Path) -> TlsFiles {
        std::fs::create_dir_all(dir).expect("tls dir");
        let openssl = super::util::find_program("openssl");
        let none = || String::new();
        let ssl = |args: &[&str]| {
            super::util::run_ok(
                Command::new(&openssl).args(args).current_dir(dir),
                Duration::from_secs(60),
                &none,
            );
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-subj",
            "/CN=wharf e2e test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        ssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-subj",
            "/CN=wharf e2e server",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write san.ext");
        ssl(&[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        TlsFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            ca: dir.join("ca.crt"),
        }
    }
}

impl Default for WharfOpts {
    fn default() -> Self {
        WharfOpts {
            tag_ttl: "5m".into(),
            max_size: None,
            upstream_extra: String::new(),
            extra_toml: String::new(),
            tls: None,
        }
    }
}

impl Wharf {
    /// `upstream_url` becomes the default upstream, named `docker.io`.
    pub fn start(dir: &Path, upstream_url: &str, tag_ttl: &str) -> Wharf {
        let opts = WharfOpts {
            tag_ttl: tag_ttl.into(),
            ..WharfOpts::default()
        };
        Wharf::start_with(dir, upstream_url, &opts)
    }

    /// Like `start`, with more of the config under the test's control.
    /// Starting again on the same `dir` reuses the data dir (a restart);
    /// the log files are overwritten.
    pub fn start_with(dir: &Path, upstream_url: &str, opts: &WharfOpts) -> Wharf {
        Wharf::start_ready(dir, upstream_url, opts, 200)
    }

    /// `start_with`, ready once `GET /v2/` answers `ready_status` (401 when
    /// the default upstream has `require_auth = true`).
    pub fn start_ready(
        dir: &Path,
        upstream_url: &str,
        opts: &WharfOpts,
        ready_status: u16,
    ) -> Wharf {
        std::fs::create_dir_all(dir).expect("wharf dir");
        let data_dir = dir.join("data");
        let config = dir.join("wharf.toml");
        let max_size = opts
            .max_size
            .as_ref()
            .map(|m| format!("max_size = \"{m}\"\n"))
            .unwrap_or_default();
        let tls = opts
            .tls
            .as_ref()
            .map(|t| {
                format!(
                    "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
                    t.cert.display(),
                    t.key.display()
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{tls}
[storage]
dir = "{data}"
{max_size}
[cache]
tag_ttl = "{tag_ttl}"

[[upstream]]
name = "docker.io"
url = "{upstream_url}"
default = true
{upstream_extra}
{extra_toml}
"#,
                data = data_dir.display(),
                tag_ttl = opts.tag_ttl,
                upstream_extra = opts.upstream_extra,
                extra_toml = opts.extra_toml,
            ),
        )
        .expect("write wharf config");
        let stdout_log = dir.join("wharf.stdout.log");
        let stderr_log = dir.join("wharf.log");
        let mut cmd = Command::new(binary());
        cmd.arg("serve").arg("--config").arg(&config);
        // Plain logs: they end up in panic messages.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut proc = Proc::spawn("wharf", cmd, Stdout::Piped, &stderr_log);
        proc.stdout_log = Some(stdout_log.clone());

        // Copy stdout to a file (so the pipe never fills) and hand the
        // listening line to us.
        let stdout = proc.take_stdout().expect("wharf stdout pipe");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut file = std::fs::File::create(&stdout_log).ok();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.starts_with("wharf listening on ") {
                    let _ = tx.send(line);
                }
            }
        });

        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(200));
                    let status = proc
                        .exited()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "still running".into());
                    panic!(
                        "wharf ({}) closed stdout without printing `wharf listening on 127.0.0.1:PORT` (process: {status})\n{}",
                        binary().display(),
                        proc.logs()
                    );
                }
            }
            if let Some(status) = proc.exited() {
                panic!(
                    "wharf exited ({status}) before printing `wharf listening on ...`\n{}",
                    proc.logs()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "wharf printed no `wharf listening on ...` line within {timeout:?}\n{}",
                    proc.logs()
                );
            }
        };
        let addr = line
            .trim_start_matches("wharf listening on ")
            .trim()
            .to_string();
        assert!(
            addr.starts_with("127.0.0.1:") && addr[10..].parse::<u16>().is_ok_and(|p| p != 0),
            "unexpected listening line {line:?}\n{}",
            proc.logs()
        );
        let mut w = Wharf {
            proc,
            addr,
            data_dir,
            config,
            tls_ca: opts.tls.as_ref().map(|t| t.ca.clone()),
        };
        let addr = w.addr.clone();
        match w.tls_ca.clone() {
            None => w.proc.wait_ready(
                &format!("GET /v2/ -> {ready_status}"),
                Duration::from_secs(10),
                || super::util::http_status(&addr, "/v2/") == Some(ready_status),
            ),
            Some(ca) => {
                let status = https_prober(&ca);
                let url = format!("https://{addr}/v2/");
                w.proc.wait_ready(
                    &format!("GET /v2/ over TLS (trusting the test CA) -> {ready_status}"),
                    Duration::from_secs(10),
                    || status(&url) == Some(ready_status),
                )
            }
        }
        w
    }

    /// `http://ADDR`, or `https://ADDR` when wharf serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The whole stderr log (tracing output).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.proc.stderr_log).unwrap_or_default()
    }

    /// How far the log has grown: a mark for `requests_since`.
    pub fn log_mark(&self) -> usize {
        std::fs::metadata(&self.proc.stderr_log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The `request` lines logged after `mark` (from `log_mark`).
    pub fn requests_since(&self, mark: usize) -> Vec<RequestLine> {
        let bytes = std::fs::read(&self.proc.stderr_log).unwrap_or_default();
        let tail = bytes.get(mark..).unwrap_or_default();
        parse_request_lines(&String::from_utf8_lossy(tail))
    }

    /// SIGTERM (then SIGKILL after the grace period) and wait for exit.
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// A status probe for `https://` URLs that trusts only `ca` (its own
/// single-thread runtime: called from the tests' synchronous code).
fn https_prober(ca: &Path) -> impl Fn(&str) -> Option<u16> {
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("CA PEM"))
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("reqwest client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("probe runtime");
    move |url: &str| {
        // Build the request inside the runtime: its timeout needs a timer.
        rt.block_on(async { client.get(url).send().await })
            .ok()
            .map(|r| r.status().as_u16())
    }
}

/// One line wharf logs per request (`INFO wharf::api: request request_id=…
/// method=GET name="library/x" reference="1" upstream="docker.io"
/// status=200 … outcome="hit" …`), split into its fields.
#[derive(Clone, Debug)]
pub struct RequestLine {
    pub fields: std::collections::BTreeMap<String, String>,
    pub line: String,
}

impl RequestLine {
    /// A field's value without quotes, "" when absent.
    pub fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or("")
    }
    pub fn method(&self) -> &str {
        self.get("method")
    }
    pub fn name(&self) -> &str {
        self.get("name")
    }
    pub fn reference(&self) -> &str {
        self.get("reference")
    }
    pub fn upstream(&self) -> &str {
        self.get("upstream")
    }
    pub fn status(&self) -> u16 {
        self.get("status").parse().unwrap_or(0)
    }
    /// hit, miss, fill, revalidated, stale, pass or error.
    pub fn outcome(&self) -> &str {
        self.get("outcome")
    }
}

/// `key=value` and `key="quoted value"` pairs of one text log line.
fn log_fields(line: &str) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        // A key starts the line or follows a space.
        if i > 0 && b[i - 1] != b' ' {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i == start || i >= b.len() || b[i] != b'=' {
            i = start + 1;
            continue;
        }
        let key = &line[start..i];
        i += 1;
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < b.len() && b[i] != b' ' {
                value.push(b[i]);
                i += 1;
            }
        }
        fields.insert(
            key.to_string(),
            String::from_utf8_lossy(&value).into_owned(),
        );
    }
    fields
}

/// The `request` lines of a stretch of wharf's text log.
pub fn parse_request_lines(text: &str) -> Vec<RequestLine> {
    text.lines()
        .filter(|l| l.contains(": request "))
        .map(|l| RequestLine {
            fields: log_fields(l),
            line: l.to_string(),
        })
        .filter(|r| r.fields.contains_key("status") && r.fields.contains_key("outcome"))
        .collect()
}

#[test]
fn parses_request_log_lines() {
    let text = "2026-01-01T00:00:00.000001Z  INFO wharf::api: request request_id=\"ab12\" peer=127.0.0.1:4242 method=HEAD name=\"library/e2e-multi\" reference=\"1\" upstream=\"quay.io\" status=200 bytes=\"512\" ms=3 outcome=\"hit\" error=\"\"\n\
                2026-01-01T00:00:00.000002Z  INFO wharf: wharf listening\n";
    let lines = parse_request_lines(text);
    assert_eq!(lines.len(), 1);
    let r = &lines[0];
    assert_eq!(
        (
            r.method(),
            r.name(),
            r.reference(),
            r.upstream(),
            r.status(),
            r.outcome()
        ),
        ("HEAD", "library/e2e-multi", "1", "quay.io", 200, "hit")
    );
    assert_eq!(r.get("error"), "");
}
