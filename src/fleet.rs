//! Storage shared by a fleet of wharf replicas: verified blobs in an
//! S3-compatible bucket, found by digest before any upstream fetch, and
//! optional lease objects so that one replica fetches a cold blob for the
//! whole fleet. Blobs go in only after the local fill verified them, and a
//! multipart upload is invisible until it completes, so a replica killed
//! mid-upload leaves no object under the final key. Talks to the bucket
//! through the `object_store` crate; knows nothing of HTTP requests,
//! upstream registries or the local store's layout.

use crate::config::S3Config;
use crate::digest::Digest;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("bucket: {0}")]
    Bucket(#[from] object_store::Error),
    #[error("reading the local copy: {0}")]
    Local(#[from] std::io::Error),
}

/// Whether this replica may fetch a cold blob from upstream.
pub enum Lease {
    /// Ours until released or expired; others wait for the blob.
    Held(HeldLease),
    /// Another replica is fetching it, until about this time.
    Elsewhere { until: SystemTime },
}

pub struct HeldLease {
    key: Key,
    renewer: tokio::task::JoinHandle<()>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseRecord {
    holder: String,
    expires_ms: u64,
}

pub struct Fleet {
    bucket: Arc<dyn ObjectStore>,
    prefix: String,
    lease_ttl: Option<Duration>,
    holder: String,
}

/// Upload parts: S3 wants at least 5 MiB for all but the last.
const PART_SIZE: usize = 8 << 20;

impl Fleet {
    /// Builds the bucket client. Credentials come from the environment
    /// (`AWS_ACCESS_KEY_ID`…, web identity, instance metadata) or from the
    /// shared credentials file (`~/.aws/credentials`, `AWS_PROFILE`).
    pub fn new(config: &S3Config) -> Result<Fleet, String> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_allow_http(endpoint.scheme() == "http");
        }
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            if let Some((id, secret, token)) = shared_credentials_file() {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = token {
                    builder = builder.with_token(token);
                }
            }
        }
        let bucket = builder.build().map_err(|e| e.to_string())?;
        Ok(Fleet {
            bucket: Arc::new(bucket),
            prefix: config.prefix.clone(),
            lease_ttl: config.lease.then_some(config.lease_ttl),
            holder: holder_name(),
        })
    }

    /// `PREFIX KIND/ALGORITHM/HEX`, built only from a validated digest.
    fn key(&self, kind: &str, digest: &Digest) -> Key {
        let (algorithm, hex) = (digest.algorithm().name(), digest.hex());
        Key::from(format!("{}{kind}/{algorithm}/{hex}", self.prefix))
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        self.key("blobs", digest)
    }

    fn lease_key(&self, digest: &Digest) -> Key {
        self.key("leases", digest)
    }

    /// The blob's size, if the bucket has it.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>, FleetError> {
        match self.bucket.head(&self.blob_key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams the whole blob from the bucket.
    pub async fn read(
        &self,
        digest: &Digest,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, FleetError>>), FleetError> {
        let got = self.bucket.get(&self.blob_key(digest)).await?;
        let len = got.meta.size;
        Ok((len, got.into_stream().map_err(FleetError::from).boxed()))
    }

    /// Streams bytes `start..end` of the blob from the bucket.
    pub async fn read_range(
        &self,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, FleetError>>, FleetError> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(start..end)),
            ..Default::default()
        };
        let got = self
            .bucket
            .get_opts(&self.blob_key(digest), options)
            .await?;
        Ok(got.into_stream().map_err(FleetError::from).boxed())
    }

    /// Uploads a verified local copy under the blob's final key. The
    /// object appears only when the upload completes.
    pub async fn upload(&self, digest: &Digest, file: std::fs::File) -> Result<(), FleetError> {
        let key = self.blob_key(digest);
        let mut writer =
            object_store::buffered::BufWriter::with_capacity(self.bucket.clone(), key, PART_SIZE);
        let mut file = tokio::fs::File::from_std(file);
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        match copied {
            Ok(_) => writer.shutdown().await.map_err(FleetError::from),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e.into())
            }
        }
    }

    /// Whether leases are on.
    pub fn leases(&self) -> bool {
        self.lease_ttl.is_some()
    }

    /// Tries to become the replica that fetches `digest` from upstream.
    /// A lease left by a replica that died is taken over once expired.
    pub async fn lease(&self, digest: &Digest) -> Result<Lease, FleetError> {
        let ttl = self.lease_ttl.unwrap_or(Duration::from_secs(120));
        let key = self.lease_key(digest);
        for _ in 0..2 {
            match self.create_lease(&key, ttl).await {
                Ok(()) => {
                    let renewer = tokio::spawn(renew(
                        self.bucket.clone(),
                        key.clone(),
                        self.holder.clone(),
                        ttl,
                    ));
                    return Ok(Lease::Held(HeldLease { key, renewer }));
                }
                Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            let until = match self.bucket.get(&key).await {
                Ok(got) => {
                    let bytes = got.bytes().await?;
                    serde_json::from_slice::<LeaseRecord>(&bytes)
                        .map(|r| SystemTime::UNIX_EPOCH + Duration::from_millis(r.expires_ms))
                        .unwrap_or(SystemTime::UNIX_EPOCH)
                }
                // Released in between: try again.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            if until > SystemTime::now() {
                return Ok(Lease::Elsewhere { until });
            }
            tracing::info!(%digest, "taking over an expired fetch lease");
            let _ = self.bucket.delete(&key).await;
        }
        // Two replicas raced for an expired lease; let the other one have it.
        Ok(Lease::Elsewhere {
            until: SystemTime::now() + ttl,
        })
    }

    async fn create_lease(&self, key: &Key, ttl: Duration) -> Result<(), object_store::Error> {
        let record = lease_record(&self.holder, ttl);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.bucket
            .put_opts(key, PutPayload::from(record), opts)
            .await
            .map(|_| ())
    }

    /// Gives the lease back, so waiting replicas stop waiting.
    pub async fn release(&self, lease: HeldLease) {
        lease.renewer.abort();
        if let Err(e) = self.bucket.delete(&lease.key).await {
            tracing::warn!(key = %lease.key, error = %e, "could not release a fetch lease; it expires by itself");
        }
    }
}

fn lease_record(holder: &str, ttl: Duration) -> Vec<u8> {
    let expires_ms = crate::index::unix_ms(SystemTime::now() + ttl);
    serde_json::to_vec(&LeaseRecord {
        holder: holder.to_owned(),
        expires_ms,
    })
    .expect("lease record serializes")
}

/// Keeps a held lease from expiring while a long fetch runs.
async fn renew(bucket: Arc<dyn ObjectStore>, key: Key, holder: String, ttl: Duration) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        let record = lease_record(&holder, ttl);
        if let Err(e) = bucket.put(&key, PutPayload::from(record)).await {
            tracing::warn!(%key, error = %e, "could not renew a fetch lease");
        }
    }
}

fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "wharf".into());
    format!("{host}/{}", std::process::id())
}

/// `aws_access_key_id`, `aws_secret_access_key` and `aws_session_token` of
/// the profile `AWS_PROFILE` (or `default`) in the shared credentials file.
fn shared_credentials_file() -> Option<(String, String, Option<String>)> {
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".aws/credentials"))
        })?;
    let text = std::fs::read_to_string(path).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    parse_credentials(&text, &profile)
}

fn parse_credentials(text: &str, profile: &str) -> Option<(String, String, Option<String>)> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if !in_profile {
            continue;
        }
        let value = Some(value.trim().to_owned());
        match key.trim() {
            "aws_access_key_id" => id = value,
            "aws_secret_access_key" => secret = value,
            "aws_session_token" => token = value,
            _ => {}
        }
    }
    Some((id?, secret?, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_profile_from_the_credentials_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[ci]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n";
        assert_eq!(
            parse_credentials(text, "default"),
            Some(("A".into(), "B".into(), None))
        );
        assert_eq!(
            parse_credentials(text, "ci"),
            Some(("C".into(), "D".into(), Some("E".into())))
        );
        assert_eq!(parse_credentials(text, "missing"), None);
    }
}
