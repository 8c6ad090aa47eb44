//! The upstream: two `docker-registry` (distribution 2.8) processes sharing
//! one filesystem root. One is open and only used to seed images through the
//! plain HTTP push API; the other sits behind Docker-Hub-style token auth
//! (our token server) and is what wharf and the clients talk to. Its access
//! log (stdout, Apache combined format) is parsed to count requests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::images::{Artifact, Blob};
use super::procs::{Proc, Stdout};
use super::token::{Signer, TokenServer, ISSUER, SERVICE};
use super::util::{find_program, http_status};

pub struct Registry {
    pub proc: Proc,
    /// `127.0.0.1:PORT`
    pub addr: String,
    pub access_log: PathBuf,
}

impl Registry {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub struct Upstream {
    // Drop order: registries before the token server they depend on.
    pub authed: Registry,
    pub open: Registry,
    pub token: TokenServer,
    pub signer: Arc<Signer>,
}

fn start_registry(name: &str, dir: &Path, root: &Path, auth: Option<(&str, &Path)>) -> Registry {
    let bin = find_program("docker-registry");
    let mut yaml = format!(
        "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:0
  secret: wharf-e2e-shared-secret
health:
  storagedriver:
    enabled: false
",
        root = root.display()
    );
    if let Some((realm, bundle)) = auth {
        yaml.push_str(&format!(
            "auth:
  token:
    realm: {realm}
    service: {SERVICE}
    issuer: {ISSUER}
    rootcertbundle: {}
",
            bundle.display()
        ));
    }
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(&config, yaml).expect("write registry config");
    let access_log = dir.join(format!("{name}.access.log"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(bin);
    cmd.arg("serve").arg(&config);
    let mut proc = Proc::spawn(name, cmd, Stdout::File(&access_log), &log);
    // Port 0: the registry logs the address it actually bound.
    let mut addr = String::new();
    proc.wait_ready("`listening on` in its log", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(i) = text.find("listening on 127.0.0.1:") {
            let rest = &text[i + "listening on ".len()..];
            let end = rest
                .find(|c: char| c != '.' && c != ':' && !c.is_ascii_digit())
                .unwrap_or(rest.len());
            addr = rest[..end].to_string();
            return true;
        }
        false
    });
    let expect = if auth.is_some() { 401 } else { 200 };
    proc.wait_ready(
        &format!("GET /v2/ -> {expect} on {addr}"),
        Duration::from_secs(20),
        || http_status(&addr, "/v2/") == Some(expect),
    );
    Registry {
        proc,
        addr,
        access_log,
    }
}

impl Upstream {
    pub fn start(rt: &tokio::runtime::Runtime, dir: &Path) -> Upstream {
        std::fs::create_dir_all(dir).expect("upstream dir");
        let signer = Arc::new(Signer::generate(&dir.join("token")));
        let token = TokenServer::start(rt, signer.clone());
        let root = dir.join("registry-data");
        let open = start_registry("registry-open", dir, &root, None);
        let authed = start_registry(
            "registry-token",
            dir,
            &root,
            Some((&token.realm, &signer.cert_pem)),
        );
        Upstream {
            authed,
            open,
            token,
            signer,
        }
    }

    /// An outage: stop both registry processes and the token server, so
    /// every upstream port refuses connections. The access log stays readable.
    pub fn stop(&mut self, rt: &tokio::runtime::Runtime) {
        self.authed.proc.stop();
        self.open.proc.stop();
        self.token.stop();
        // Let the accept loop see the shutdown and drop its listener.
        let realm = self.token.realm.clone();
        let addr = realm
            .trim_start_matches("http://")
            .trim_end_matches("/token")
            .to_string();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            let refused = rt.block_on(tokio::net::TcpStream::connect(&addr)).is_err();
            if refused {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("token server {realm} still accepts connections after stop");
    }

    /// Push every artifact through the open registry.
    pub fn seed(&self, rt: &tokio::runtime::Runtime, artifacts: &[&Artifact]) {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("reqwest client");
        let base = self.open.url();
        rt.block_on(async {
            for art in artifacts {
                if let Err(e) = push(&client, &base, art).await {
                    panic!(
                        "seeding {}:{} into {base} failed: {e}\n{}",
                        art.repo,
                        art.tag,
                        self.open.proc.logs()
                    );
                }
            }
        });
    }

    /// The token-authenticated registry's access log, parsed, after waiting
    /// for the log to stop growing (lines are written when responses end).
    pub fn access_log(&self) -> AccessLog {
        let path = &self.authed.access_log;
        let mut last = u64::MAX;
        let start = Instant::now();
        loop {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len == last || start.elapsed() > Duration::from_secs(3) {
                break;
            }
            last = len;
            std::thread::sleep(Duration::from_millis(300));
        }
        AccessLog::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }

    pub fn logs(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.authed.proc.logs(),
            super::util::tail(&self.authed.access_log, 40),
            self.token.summary()
        )
    }
}

async fn push(client: &reqwest::Client, base: &str, art: &Artifact) -> Result<(), String> {
    for img in &art.images {
        for blob in img.blobs() {
            push_blob(client, base, &art.repo, blob).await?;
        }
        if art.is_index() {
            push_manifest(client, base, &art.repo, &img.manifest.digest, &img.manifest).await?;
        }
    }
    push_manifest(client, base, &art.repo, &art.tag, &art.top).await
}

async fn push_blob(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    blob: &Blob,
) -> Result<(), String> {
    let e = |what: &str, err: reqwest::Error| format!("{what}: {err}");
    let head = client
        .head(format!("{base}/v2/{repo}/blobs/{}", blob.digest))
        .send()
        .await
        .map_err(|x| e("HEAD blob", x))?;
    if head.status() == 200 {
        return Ok(());
    }
    let start = client
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .map_err(|x| e("POST upload", x))?;
    if start.status() != 202 {
        return Err(format!(
            "POST upload: {} {}",
            start.status(),
            start.text().await.unwrap_or_default()
        ));
    }
    let loc = start
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .ok_or("upload without Location")?
        .to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{base}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let put = client
        .put(format!("{loc}{sep}digest={}", blob.digest))
        .header("Content-Type", "application/octet-stream")
        .body(blob.data.clone())
        .send()
        .await
        .map_err(|x| e("PUT blob", x))?;
    if put.status() != 201 {
        return Err(format!(
            "PUT blob {}: {} {}",
            blob.digest,
            put.status(),
            put.text().await.unwrap_or_default()
        ));
    }
    Ok(())
}

async fn push_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    m: &Blob,
) -> Result<(), String> {
    let put = client
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", &m.media_type)
        .body(m.data.clone())
        .send()
        .await
        .map_err(|x| format!("PUT manifest: {x}"))?;
    let status = put.status();
    let digest = put
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if status != 201 {
        return Err(format!(
            "PUT manifest {repo}:{reference}: {status} {}",
            put.text().await.unwrap_or_default()
        ));
    }
    if digest != m.digest {
        return Err(format!(
            "registry says manifest digest {digest}, expected {}",
            m.digest
        ));
    }
    Ok(())
}

/// One access-log line.
#[derive(Clone, Debug)]
pub struct AccessEntry {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: String,
    pub status: u16,
    pub user_agent: String,
}

#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    pub entries: Vec<AccessEntry>,
}

impl AccessLog {
    /// Parse Apache combined format:
    /// `127.0.0.1 - - [date] "GET /v2/x HTTP/1.1" 200 2 "referer" "user-agent"`.
    pub fn parse(text: &str) -> AccessLog {
        let mut entries = Vec::new();
        for line in text.lines() {
            let mut quoted = line.split('"');
            let (Some(_), Some(request), Some(after)) =
                (quoted.next(), quoted.next(), quoted.next())
            else {
                continue;
            };
            let _referer = quoted.next();
            let _ = quoted.next();
            let user_agent = quoted.next().unwrap_or("").to_string();
            let mut req = request.split(' ');
            let (Some(method), Some(target)) = (req.next(), req.next()) else {
                continue;
            };
            let Some(status) = after.split_whitespace().next().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            entries.push(AccessEntry {
                method: method.into(),
                path: path.into(),
                query: query.into(),
                status,
                user_agent,
            });
        }
        AccessLog { entries }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries after the first `n` (what happened since an earlier snapshot).
    pub fn since(&self, n: usize) -> AccessLog {
        AccessLog {
            entries: self.entries.iter().skip(n).cloned().collect(),
        }
    }

    pub fn count(&self, f: impl Fn(&AccessEntry) -> bool) -> usize {
        self.entries.iter().filter(|e| f(e)).count()
    }

    /// GETs of `/v2/<repo>/blobs/<digest>`, any status (401s included).
    pub fn blob_gets(&self, repo: &str, digest: &str) -> usize {
        let p = format!("/v2/{repo}/blobs/{digest}");
        self.count(|e| e.method == "GET" && e.path == p)
    }

    /// Successful (200/206) GETs of a blob.
    pub fn blob_gets_ok(&self, repo: &str, digest: &str) -> usize {
        let p = format!("/v2/{repo}/blobs/{digest}");
        self.count(|e| e.method == "GET" && e.path == p && (e.status == 200 || e.status == 206))
    }

    /// GETs of any blob, any repository.
    pub fn all_blob_gets(&self) -> usize {
        self.count(|e| e.method == "GET" && e.path.contains("/blobs/"))
    }

    /// Requests (`method`, or any method if None) for `/v2/<repo>/manifests/<reference>`.
    pub fn manifest_requests(&self, method: Option<&str>, repo: &str, reference: &str) -> usize {
        let p = format!("/v2/{repo}/manifests/{reference}");
        self.count(|e| method.is_none_or(|m| e.method == m) && e.path == p)
    }

    /// Manifest requests of any repository and reference.
    pub fn all_manifest_requests(&self, method: Option<&str>) -> usize {
        self.count(|e| method.is_none_or(|m| e.method == m) && e.path.contains("/manifests/"))
    }

    pub fn dump(&self) -> String {
        self.entries
            .iter()
            .map(|e| {
                format!(
                    "{} {}{}{} -> {} [{}]",
                    e.method,
                    e.path,
                    if e.query.is_empty() { "" } else { "?" },
                    e.query,
                    e.status,
                    e.user_agent
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[test]
fn parses_combined_log_lines() {
    let log = AccessLog::parse(
        "127.0.0.1 - - [22/Nov/2026:04:25:46 +0000] \"GET /v2/ HTTP/1.1\" 200 2 \"\" \"curl/7.88.1\"\n\
         127.0.0.1 - - [22/Nov/2026:04:25:46 +0000] \"GET /v2/library/x/blobs/sha256:00?ns=docker.io HTTP/1.1\" 401 157 \"\" \"containerd/1.6\"\n\
         garbage\n",
    );
    assert_eq!(log.len(), 2);
    assert_eq!(log.blob_gets("library/x", "sha256:00"), 1);
    assert_eq!(log.blob_gets_ok("library/x", "sha256:00"), 0);
    assert_eq!(log.entries[1].query, "ns=docker.io");
    assert_eq!(log.entries[1].user_agent, "containerd/1.6");
}
