//! Micro-benchmarks of the per-request hot paths that need no I/O: request
//! routing (`wharf::api::route::parse`) and streaming digest verification
//! (`wharf::digest::Verifier`). Run: `cargo bench --bench micro`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::Method;
use wharf::api::route;
use wharf::digest::{Algorithm, Verifier};

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn routing(c: &mut Criterion) {
    let blob = format!("/v2/library/alpine/blobs/{DIGEST}");
    let deep = format!("/v2/ghcr.io/some-org/team/sub.project/app_name/blobs/{DIGEST}");
    let cases: [(&str, Method, &str, Option<&str>); 6] = [
        ("base", Method::GET, "/v2/", None),
        (
            "tag_manifest",
            Method::GET,
            "/v2/library/alpine/manifests/3.20",
            None,
        ),
        (
            "tag_manifest_ns",
            Method::HEAD,
            "/v2/library/alpine/manifests/3.20",
            Some("ns=docker.io"),
        ),
        ("blob", Method::GET, &blob, Some("ns=docker.io")),
        ("blob_deep_name", Method::GET, &deep, None),
        (
            "rejected_traversal",
            Method::GET,
            "/v2/library/../etc/blobs/sha256:zz",
            None,
        ),
    ];
    let mut group = c.benchmark_group("route_parse");
    for (name, method, path, query) in &cases {
        group.bench_with_input(BenchmarkId::from_parameter(name), path, |b, path| {
            b.iter(|| route::parse(black_box(method), black_box(path), black_box(*query)))
        });
    }
    group.finish();
}

fn hashing(c: &mut Criterion) {
    let mut group = c.benchmark_group("verifier");
    for (label, size) in [
        ("4KiB", 4usize << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
    ] {
        let data = vec![0xA5u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            group.bench_with_input(
                BenchmarkId::new(algorithm.name(), label),
                &data,
                |b, data| {
                    b.iter(|| {
                        let mut v = Verifier::new(algorithm);
                        v.update(black_box(data));
                        v.finish()
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, routing, hashing);
criterion_main!(benches);
