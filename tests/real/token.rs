//! A Docker-Hub-style token server, served from the test process.
//!
//! `GET /token?service=S&scope=repository:NAME:pull` answers
//! `{"token", "access_token", "expires_in": 300}` with an RS256 JWT whose
//! header carries the self-signed certificate as its single `x5c` entry; the
//! registry's `rootcertbundle` is that same certificate. Keys come from the
//! `openssl` CLI and signing shells out to `openssl dgst -sha256 -sign`, so
//! no crypto crate is needed.

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::util::{find_program, run_ok};

pub const SERVICE: &str = "wharf-e2e-upstream";
pub const ISSUER: &str = "wharf-e2e-token-issuer";

pub struct Signer {
    openssl: PathBuf,
    key_pem: PathBuf,
    pub cert_pem: PathBuf,
    x5c: String,
}

impl Signer {
    /// A fresh self-signed RSA-2048 certificate and key in `dir`.
    pub fn generate(dir: &Path) -> Signer {
        std::fs::create_dir_all(dir).expect("token dir");
        let openssl = find_program("openssl");
        let key_pem = dir.join("token-key.pem");
        let cert_pem = dir.join("token-cert.pem");
        let cert_der = dir.join("token-cert.der");
        let none = || String::new();
        run_ok(
            Command::new(&openssl)
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
                ])
                .args(["-subj", "/CN=wharf-e2e-token-issuer"])
                .arg("-keyout")
                .arg(&key_pem)
                .arg("-out")
                .arg(&cert_pem),
            Duration::from_secs(60),
            &none,
        );
        run_ok(
            Command::new(&openssl)
                .args(["x509", "-outform", "DER", "-in"])
                .arg(&cert_pem)
                .arg("-out")
                .arg(&cert_der),
            Duration::from_secs(30),
            &none,
        );
        let der = std::fs::read(&cert_der).expect("read cert der");
        Signer {
            openssl,
            key_pem,
            cert_pem,
            x5c: STANDARD.encode(der),
        }
    }

    pub fn sign(&self, claims: &serde_json::Value) -> Result<String, String> {
        let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("json")),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("json"))
        );
        let mut child = Command::new(&self.openssl)
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key_pem)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn openssl: {e}"))?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .map_err(|e| format!("write to openssl: {e}"))?;
        let out = child
            .wait_with_output()
            .map_err(|e| format!("openssl: {e}"))?;
        if !out.status.success() || out.stdout.is_empty() {
            return Err(format!(
                "openssl dgst failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(&out.stdout)))
    }
}

#[derive(Default)]
pub struct Stats {
    pub requests: AtomicUsize,
    /// Every `scope` parameter seen, in order.
    pub scopes: Mutex<Vec<String>>,
    pub errors: Mutex<Vec<String>>,
}

pub struct TokenServer {
    pub realm: String,
    pub stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TokenServer {
    pub fn start(rt: &tokio::runtime::Runtime, signer: Arc<Signer>) -> TokenServer {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind token server");
        let addr = listener.local_addr().expect("token addr");
        let stats = Arc::new(Stats::default());
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = stats.clone();
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let (st, signer) = (st.clone(), signer.clone());
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                handle(st.clone(), signer.clone(), req)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        TokenServer {
            realm: format!("http://{addr}/token"),
            stats,
            shutdown: Some(tx),
        }
    }

    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }

    pub fn summary(&self) -> String {
        format!(
            "token server {}: {} requests, scopes {:?}, errors {:?}",
            self.realm,
            self.requests(),
            self.stats.scopes.lock().expect("lock"),
            self.stats.errors.lock().expect("lock")
        )
    }
}

impl TokenServer {
    /// Stop accepting connections (the listening socket is closed, so new
    /// connections are refused). Idempotent; also done on drop.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&body).expect("json"),
        )))
        .expect("response")
}

async fn handle(
    stats: Arc<Stats>,
    signer: Arc<Signer>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    stats.requests.fetch_add(1, Ordering::SeqCst);
    if req.uri().path() != "/token" {
        return Ok(reply(StatusCode::NOT_FOUND, json!({"error": "not found"})));
    }
    // GET with a query (anonymous Docker-style), or POST with a form body
    // (the OAuth2 flow containerd uses when it has credentials).
    let mut params: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    if req.method() == hyper::Method::POST {
        if let Ok(body) = req.into_body().collect().await {
            params.extend(url::form_urlencoded::parse(&body.to_bytes()).into_owned());
        }
    }
    let mut access = Vec::new();
    let mut subject = String::from("anonymous");
    for (k, v) in &params {
        match k.as_str() {
            "scope" => {
                stats.scopes.lock().expect("lock").push(v.clone());
                // A scope parameter may hold several space-separated scopes.
                for scope in v.split(' ').filter(|s| !s.is_empty()) {
                    let Some((kind, rest)) = scope.split_once(':') else {
                        continue;
                    };
                    let Some((name, actions)) = rest.rsplit_once(':') else {
                        continue;
                    };
                    if kind != "repository" {
                        continue;
                    }
                    // Upstream is read-only for clients: grant pull at most.
                    let granted: Vec<&str> = actions.split(',').filter(|a| *a == "pull").collect();
                    access.push(json!({"type": "repository", "name": name, "actions": granted}));
                }
            }
            "service" if v != SERVICE => {
                stats
                    .errors
                    .lock()
                    .expect("lock")
                    .push(format!("unexpected service {v:?}"));
            }
            "account" | "username" => subject = v.clone(),
            _ => {}
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let n = stats.requests.load(Ordering::SeqCst);
    let claims = json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 30,
        "iat": now,
        "jti": format!("wharf-e2e-{now}-{n}"),
        "access": access,
    });
    let signed = match tokio::task::spawn_blocking(move || signer.sign(&claims)).await {
        Ok(r) => r,
        Err(join) => Err(join.to_string()),
    };
    match signed {
        Ok(token) => Ok(reply(
            StatusCode::OK,
            json!({"token": token, "access_token": token, "expires_in": 300}),
        )),
        Err(e) => {
            stats.errors.lock().expect("lock").push(e.clone());
            Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e}),
            ))
        }
    }
}
