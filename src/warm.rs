//! `wharf warm`: pre-pulls images through a wharf, as a runtime would
//! (manifest or index, the chosen platforms' manifests, config and layers),
//! so a rollout finds them cached. Blob bytes are read to the end and
//! verified, then dropped. Talks HTTP to a wharf only; never touches a data
//! dir itself.

use crate::digest::{Digest, Verifier};
use crate::upstream::MANIFEST_TYPES;
use futures_util::StreamExt;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// An image to warm: the name as a client puts it in the path (a leading
/// registry host routes to that upstream), and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub reference: String,
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sep = if self.reference.contains(':') {
            '@'
        } else {
            ':'
        };
        write!(f, "{}{sep}{}", self.name, self.reference)
    }
}

/// Parses `alpine`, `alpine:3.20`, `ghcr.io/org/app:v1`, `x/y@sha256:…`.
pub fn parse_image(text: &str) -> Result<ImageRef, String> {
    let text = text.trim();
    let (name, reference) = match text.split_once('@') {
        Some((name, digest)) => {
            digest.parse::<Digest>().map_err(|e| e.to_string())?;
            (name, digest.to_owned())
        }
        None => match text.rsplit_once(':') {
            // A colon after the last slash is a tag; before it, a registry port.
            Some((name, tag)) if !tag.contains('/') => (name, tag.to_owned()),
            _ => (text, "latest".to_owned()),
        },
    };
    let valid = !name.is_empty()
        && name
            .split('/')
            .all(crate::api::route::is_valid_name_component);
    if !valid || !crate::api::route::is_valid_tag(&reference) && !reference.contains(':') {
        return Err(format!(
            "{text:?} is not an image reference such as alpine:3.20 or ghcr.io/org/app:v1"
        ));
    }
    Ok(ImageRef {
        name: name.to_owned(),
        reference,
    })
}

/// Which platforms of a multi-arch index to warm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    All,
    /// `os/arch` or `os/arch/variant`.
    Only(Vec<String>),
}

impl Platforms {
    fn wants(&self, platform: &serde_json::Value) -> bool {
        let Platforms::Only(list) = self else {
            return true;
        };
        let field = |k: &str| platform[k].as_str().unwrap_or("");
        let full = match field("variant") {
            "" => format!("{}/{}", field("os"), field("architecture")),
            v => format!("{}/{}/{v}", field("os"), field("architecture")),
        };
        list.iter()
            .any(|p| *p == full || full.starts_with(&format!("{p}/")))
    }
}

#[derive(Debug, Default)]
pub struct Warmed {
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: wharf answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: content hashes to {actual}, not {expected}")]
    Digest {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{0}")]
    Manifest(String),
}

/// Pulls images through the wharf at `base` (e.g. `http://127.0.0.1:5000`).
pub struct Warmer {
    base: String,
    http: reqwest::Client,
    platforms: Platforms,
}

impl Warmer {
    pub fn new(base: &str, platforms: Platforms) -> Warmer {
        Warmer {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("static client settings"),
            platforms,
        }
    }

    /// Warms every image, reporting progress on a terminal (bars) or as
    /// plain lines. Returns the images that failed.
    pub async fn warm_all(&self, images: &[ImageRef]) -> Vec<(ImageRef, WarmError)> {
        let bars = std::io::stderr()
            .is_terminal()
            .then(indicatif::MultiProgress::new);
        let overall = bars.as_ref().map(|m| {
            let bar = m.add(indicatif::ProgressBar::new(images.len() as u64));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} images",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix("warm");
            bar
        });
        let mut failed = Vec::new();
        for image in images {
            let started = Instant::now();
            let bar = bars.as_ref().map(|m| {
                let bar = m.add(indicatif::ProgressBar::new(0));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg:40!} {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
                    )
                    .expect("static template"),
                );
                bar.set_message(image.to_string());
                bar
            });
            let result = self.warm(image, bar.as_ref()).await;
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            match result {
                Ok(w) => {
                    let line = format!(
                        "warmed {image}: {} manifest(s), {} blob(s), {} in {:.1}s",
                        w.manifests,
                        w.blobs,
                        crate::admin::human_bytes(w.bytes),
                        started.elapsed().as_secs_f64()
                    );
                    match &bars {
                        Some(m) => {
                            let _ = m.println(line);
                        }
                        None => eprintln!("{line}"),
                    }
                }
                Err(e) => {
                    let line = format!("FAILED {image}: {e}");
                    match &bars {
                        Some(m) => {
                            let _ = m.println(line);
                        }
                        None => eprintln!("{line}"),
                    }
                    failed.push((image.clone(), e));
                }
            }
            if let Some(overall) = &overall {
                overall.inc(1);
            }
        }
        if let Some(overall) = overall {
            overall.finish_and_clear();
        }
        failed
    }

    /// Warms one image: its manifest, the wanted platforms of an index,
    /// and every config and layer blob.
    pub async fn warm(
        &self,
        image: &ImageRef,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<Warmed, WarmError> {
        let mut warmed = Warmed::default();
        let mut manifests = vec![image.reference.clone()];
        while let Some(reference) = manifests.pop() {
            let url = format!("{}/v2/{}/manifests/{reference}", self.base, image.name);
            let body = self
                .get(&url, MANIFEST_TYPES)
                .await?
                .bytes()
                .await
                .map_err(|e| request_error(&url, e))?;
            warmed.manifests += 1;
            let doc: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| WarmError::Manifest(format!("{url}: not JSON: {e}")))?;
            if let Some(children) = doc["manifests"].as_array() {
                let wanted: Vec<String> = children
                    .iter()
                    .filter(|child| self.platforms.wants(&child["platform"]))
                    .filter_map(|child| child["digest"].as_str().map(str::to_owned))
                    .collect();
                if wanted.is_empty() {
                    return Err(WarmError::Manifest(format!(
                        "{image}: no manifest in the index matches {:?}",
                        self.platforms
                    )));
                }
                manifests.extend(wanted);
                continue;
            }
            let refs = crate::manifest::references(&body);
            if let Some(bar) = bar {
                bar.inc_length(refs.blobs.iter().map(|(_, size)| size).sum());
            }
            for (digest, _) in refs.blobs {
                warmed.bytes += self.blob(&image.name, &digest, bar).await?;
                warmed.blobs += 1;
            }
        }
        Ok(warmed)
    }

    async fn blob(
        &self,
        name: &str,
        digest: &Digest,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<u64, WarmError> {
        let url = format!("{}/v2/{name}/blobs/{digest}", self.base);
        let mut body = self.get(&url, "*/*").await?.bytes_stream();
        let mut verifier = Verifier::new(digest.algorithm());
        let mut len = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| request_error(&url, e))?;
            verifier.update(&chunk);
            len += chunk.len() as u64;
            if let Some(bar) = bar {
                bar.inc(chunk.len() as u64);
            }
        }
        let actual = verifier.finish();
        if actual != *digest {
            return Err(WarmError::Digest {
                url,
                expected: digest.clone(),
                actual,
            });
        }
        Ok(len)
    }

    async fn get(&self, url: &str, accept: &str) -> Result<reqwest::Response, WarmError> {
        let resp = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .map_err(|e| request_error(url, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Err(WarmError::Status {
            url: url.to_owned(),
            status,
            body: body.chars().take(300).collect(),
        })
    }
}

fn request_error(url: &str, e: reqwest::Error) -> WarmError {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    WarmError::Request {
        url: url.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let r = |s: &str| parse_image(s).map(|i| (i.name, i.reference));
        assert_eq!(r("alpine"), Ok(("alpine".into(), "latest".into())));
        assert_eq!(r("alpine:3.20"), Ok(("alpine".into(), "3.20".into())));
        assert_eq!(
            r("ghcr.io/org/app:v1"),
            Ok(("ghcr.io/org/app".into(), "v1".into()))
        );
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            r(&format!("library/a@{d}")),
            Ok(("library/a".into(), d.to_string()))
        );
        assert!(r("Alpine").is_err());
        assert!(r("a@sha256:nope").is_err());
        assert!(r("a:-bad").is_err());
        assert_eq!(parse_image("x/y:1").unwrap().to_string(), "x/y:1");
    }

    #[test]
    fn platform_selection() {
        let amd64 = serde_json::json!({"os": "linux", "architecture": "amd64"});
        let arm = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let only = Platforms::Only(vec!["linux/amd64".into()]);
        assert!(only.wants(&amd64));
        assert!(!only.wants(&arm));
        assert!(Platforms::Only(vec!["linux/arm64".into()]).wants(&arm));
        assert!(Platforms::All.wants(&arm));
    }
}
