//! What an image manifest or index refers to: its config and layer blobs,
//! or its child manifests. Parses untrusted JSON leniently: unknown fields
//! are ignored, malformed digests are skipped. No I/O.

use crate::digest::Digest;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    pub blobs: Vec<(Digest, u64)>,
    pub manifests: Vec<(Digest, u64)>,
}

#[derive(serde::Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
}

#[derive(serde::Deserialize)]
struct Document {
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

pub fn references(bytes: &[u8]) -> References {
    let Ok(doc) = serde_json::from_slice::<Document>(bytes) else {
        return References::default();
    };
    let parse = |d: Descriptor| d.digest.parse().ok().map(|digest| (digest, d.size));
    References {
        blobs: doc
            .config
            .into_iter()
            .chain(doc.layers)
            .filter_map(parse)
            .collect(),
        manifests: doc.manifests.into_iter().filter_map(parse).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_and_index_references() {
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let image = format!(
            r#"{{"config":{{"digest":"{a}","size":1}},"layers":[{{"digest":"{b}","size":2}},{{"digest":"bogus"}}]}}"#
        );
        assert_eq!(
            references(image.as_bytes()),
            References {
                blobs: vec![(a.clone(), 1), (b, 2)],
                manifests: vec![]
            }
        );
        let index = format!(r#"{{"manifests":[{{"digest":"{a}","size":3,"platform":{{}}}}]}}"#);
        assert_eq!(references(index.as_bytes()).manifests, vec![(a, 3)]);
        assert_eq!(references(b"not json"), References::default());
    }
}
