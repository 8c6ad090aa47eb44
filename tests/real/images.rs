//! Real test images, built in memory once per test process: gzip'd tar
//! layers holding real files (one of them a few MiB of incompressible data),
//! configs whose `rootfs.diff_ids` are the sha256 of the uncompressed tars,
//! and manifests in Docker and OCI media types plus a two-platform OCI index.
//! Everything is deterministic, so digests are stable across runs.

use std::io::Write;
use std::sync::OnceLock;

use flate2::{write::GzEncoder, Compression};
use serde_json::json;

use super::util::{sha256_digest, sha256_hex};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

const MTIME: u64 = 1_700_000_000;
const MIB: usize = 1 << 20;

#[derive(Clone)]
pub struct Blob {
    pub digest: String,
    pub media_type: String,
    pub data: Vec<u8>,
}

impl Blob {
    fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            digest: sha256_digest(&data),
            media_type: media_type.to_string(),
            data,
        }
    }
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "size": self.data.len(), "digest": self.digest})
    }
}

/// A file the unpacked root filesystem must contain.
pub struct ExpectedFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// One platform image: manifest, config, layers, and what its rootfs holds.
pub struct Image {
    pub arch: String,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub files: Vec<ExpectedFile>,
    /// Removed by a whiteout in a later layer.
    pub absent: Vec<String>,
}

impl Image {
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// What a tag points at: a single image or an index of images.
pub struct Artifact {
    /// Repository as stored upstream, e.g. `library/e2e-docker`.
    pub repo: String,
    pub tag: String,
    /// The manifest the tag resolves to (image manifest or index).
    pub top: Blob,
    pub images: Vec<Image>,
    native: usize,
}

impl Artifact {
    /// `e2e-docker` (what `docker pull` is given).
    pub fn short(&self) -> &str {
        self.repo.strip_prefix("library/").unwrap_or(&self.repo)
    }
    /// `docker.io/library/e2e-docker:1` (what `ctr images pull` is given).
    pub fn docker_io_ref(&self) -> String {
        format!("docker.io/{}:{}", self.repo, self.tag)
    }
    pub fn is_index(&self) -> bool {
        self.top.media_type == OCI_INDEX
    }
    /// The image for this machine's platform.
    pub fn native(&self) -> &Image {
        &self.images[self.native]
    }
    /// Images for other platforms (never to be fetched by a client here).
    pub fn foreign(&self) -> impl Iterator<Item = &Image> {
        let n = self.native;
        self.images
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != n)
            .map(|(_, im)| im)
    }
}

pub struct TestImages {
    pub docker: Artifact,
    pub oci: Artifact,
    pub multi: Artifact,
}

impl TestImages {
    pub fn all(&self) -> [&Artifact; 3] {
        [&self.docker, &self.oci, &self.multi]
    }
}

pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("e2e images are built for amd64 and arm64; this machine is {other}"),
    }
}

/// Built once per test process (~13 MiB of layers).
pub fn get() -> &'static TestImages {
    static IMAGES: OnceLock<TestImages> = OnceLock::new();
    IMAGES.get_or_init(build_all)
}

fn build_all() -> TestImages {
    let native = native_arch();
    let docker = single("library/e2e-docker", native, 4 * MIB, false);
    let oci = single("library/e2e-oci", native, 4 * MIB, true);

    let children: Vec<Image> = [("amd64", 3 * MIB), ("arm64", MIB)]
        .into_iter()
        .map(|(arch, big)| build_image("library/e2e-multi", arch, big, true))
        .collect();
    let native_idx = children
        .iter()
        .position(|c| c.arch == native)
        .expect("native child");
    let manifests: Vec<serde_json::Value> = children
        .iter()
        .map(|c| {
            let mut platform = json!({"architecture": c.arch, "os": "linux"});
            if c.arch == "arm64" {
                platform["variant"] = json!("v8");
            }
            let mut d = c.manifest.descriptor();
            d["platform"] = platform;
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let multi = Artifact {
        repo: "library/e2e-multi".into(),
        tag: "1".into(),
        top: Blob::new(OCI_INDEX, serde_json::to_vec_pretty(&index).expect("json")),
        images: children,
        native: native_idx,
    };
    TestImages { docker, oci, multi }
}

fn single(repo: &str, arch: &str, big: usize, oci: bool) -> Artifact {
    let img = build_image(repo, arch, big, oci);
    Artifact {
        repo: repo.into(),
        tag: "1".into(),
        top: img.manifest.clone(),
        images: vec![img],
        native: 0,
    }
}

struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    fn new() -> Self {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }
    fn dir(&mut self, path: &str) {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.b
            .append_data(&mut h, path, std::io::empty())
            .expect("tar dir");
    }
    fn file(&mut self, path: &str, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        self.b.append_data(&mut h, path, data).expect("tar file");
    }
    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.b
            .append_link(&mut h, path, target)
            .expect("tar symlink");
    }
    fn finish(self) -> Vec<u8> {
        self.b.into_inner().expect("tar finish")
    }
}

/// Deterministic incompressible bytes (xorshift64*), so gzip cannot shrink
/// the big layer and streaming actually moves megabytes.
fn random_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in seed.bytes() {
        x = (x ^ b as u64).wrapping_mul(0x100_0000_01B3);
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn gzip(tar: &[u8], level: u32) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(tar).expect("gzip");
    e.finish().expect("gzip finish")
}

fn build_image(repo: &str, arch: &str, big: usize, oci: bool) -> Image {
    let id = format!("{repo}:1 ({arch}, {})", if oci { "oci" } else { "docker" });
    let hello_v1 = format!("hello v1 from {id}\n");
    let hello_v3 = format!("hello v3 (final) from {id}\n");
    let removed = format!("this file is whited out in layer 3 of {id}\n");
    let top = format!("layer 3 of {id}\n");
    let random = random_bytes(&id, big);

    // Layer 1: a small tree, a symlink, and files layer 3 changes.
    let mut l1 = TarBuilder::new();
    l1.dir("etc/");
    l1.dir("etc/e2e/");
    l1.file("etc/e2e/hello.txt", hello_v1.as_bytes());
    l1.file("etc/e2e/removed.txt", removed.as_bytes());
    l1.symlink("etc/e2e/link", "hello.txt");
    l1.file(
        "etc/e2e-release",
        format!("NAME=wharf-e2e\nID={id}\n").as_bytes(),
    );
    // Layer 2: the big incompressible one.
    let mut l2 = TarBuilder::new();
    l2.dir("data/");
    l2.file("data/random.bin", &random);
    // Layer 3: overwrite, whiteout, add.
    let mut l3 = TarBuilder::new();
    l3.dir("etc/");
    l3.dir("etc/e2e/");
    l3.file("etc/e2e/hello.txt", hello_v3.as_bytes());
    l3.file("etc/e2e/.wh.removed.txt", b"");
    l3.file("etc/e2e/top.txt", top.as_bytes());

    let tars = [(l1.finish(), 6), (l2.finish(), 1), (l3.finish(), 6)];
    let layer_type = if oci { OCI_LAYER } else { DOCKER_LAYER };
    let diff_ids: Vec<String> = tars.iter().map(|(t, _)| sha256_digest(t)).collect();
    let layers: Vec<Blob> = tars
        .iter()
        .map(|(t, lvl)| Blob::new(layer_type, gzip(t, *lvl)))
        .collect();

    let mut config = json!({
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/",
            "Labels": {"org.wharf.e2e": id}
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2023-11-14T22:13:20Z", "created_by": "wharf e2e: small tree"},
            {"created": "2023-11-14T22:13:20Z", "created_by": "wharf e2e: big random file"},
            {"created": "2023-11-14T22:13:20Z", "created_by": "wharf e2e: overwrite and whiteout"}
        ]
    });
    if arch == "arm64" {
        config["variant"] = json!("v8");
    }
    let config = Blob::new(
        if oci { OCI_CONFIG } else { DOCKER_CONFIG },
        serde_json::to_vec(&config).expect("json"),
    );
    let manifest_type = if oci { OCI_MANIFEST } else { DOCKER_MANIFEST };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(
        manifest_type,
        serde_json::to_vec_pretty(&manifest).expect("json"),
    );

    let file = |path: &str, data: &[u8]| ExpectedFile {
        path: path.into(),
        sha256: sha256_hex(data),
        size: data.len() as u64,
    };
    Image {
        arch: arch.into(),
        manifest,
        config,
        layers,
        files: vec![
            file("etc/e2e/hello.txt", hello_v3.as_bytes()),
            file("etc/e2e/top.txt", top.as_bytes()),
            file("data/random.bin", &random),
        ],
        absent: vec!["etc/e2e/removed.txt".into()],
    }
}
