//! Client-side helpers shared by the integration tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that never uses a proxy from the environment and gives up after 20 s.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Everything a test needs from one response, with the body read to the end
/// (or the error that cut it short).
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Outcome {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    /// The body, panicking with context if it was cut short.
    pub fn bytes(&self) -> Bytes {
        match &self.body {
            Ok(b) => b.clone(),
            Err(e) => panic!("body of {} response failed: {e}", self.status),
        }
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes()).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.bytes())
            )
        })
    }
    /// The first `errors[].code` of an OCI error body.
    pub fn error_code(&self) -> Option<String> {
        let b = self.body.as_ref().ok()?;
        let v: serde_json::Value = serde_json::from_slice(b).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
    /// A response a registry client would accept as the complete, successful body.
    pub fn looks_complete_ok(&self) -> bool {
        let Ok(b) = &self.body else { return false };
        if !self.status.is_success() {
            return false;
        }
        match self
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            Some(l) => l == b.len(),
            None => true,
        }
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Result<Outcome, reqwest::Error> {
    let resp = req.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| format!("{e:?}"));
    Ok(Outcome {
        status,
        headers,
        body,
    })
}

pub async fn get(client: &reqwest::Client, url: &str) -> Outcome {
    send(client.get(url))
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:?}"))
}

pub async fn head(client: &reqwest::Client, url: &str) -> Outcome {
    send(client.head(url))
        .await
        .unwrap_or_else(|e| panic!("HEAD {url}: {e:?}"))
}

pub async fn get_range(client: &reqwest::Client, url: &str, range: &str) -> Outcome {
    send(client.get(url).header("range", range))
        .await
        .unwrap_or_else(|e| panic!("GET {url} Range {range}: {e:?}"))
}

/// What a raw HTTP/1.1 exchange returned, byte for byte.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    /// Everything after the blank line, until the server closed.
    pub rest: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
    pub fn error_code(&self) -> Option<String> {
        // Bodies may be chunked; find the JSON object in what came back.
        let s = String::from_utf8_lossy(&self.rest);
        let start = s.find('{')?;
        let end = s.rfind('}')?;
        let v: serde_json::Value = serde_json::from_str(&s[start..=end]).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_string)
    }
}

/// Send one request exactly as written (no path normalisation) with
/// `Connection: close`, read until the server closes (at most 10 s).
pub async fn raw(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra_headers: &[(&str, &str)],
) -> RawResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head for {method} {target}: {:?}",
                String::from_utf8_lossy(&buf)
            )
        });
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head,
        rest: buf[split + 4..].to_vec(),
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}
