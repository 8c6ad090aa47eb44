//! TLS on the API listener: skopeo pulls over HTTPS with a test CA, ALPN
//! offers HTTP/2, and a certificate swapped on disk is served to new
//! handshakes after SIGHUP. Certificates come from the `openssl` CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::fake_upstream::*;

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, and a server certificate for 127.0.0.1 signed by it, as
/// `<name>.crt` / `<name>.key`.
fn issue(dir: &Path, name: &str) {
    if !dir.join("ca.crt").exists() {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=wharf test CA",
            ],
            dir,
        );
    }
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
        dir,
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        dir,
    );
}

/// The subject CN of the certificate a fresh handshake with `addr` gets.
fn served_subject(addr: &str, ca: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -subject",
            ca.display()
        ))
        .output()
        .unwrap();
    // OpenSSL prints `subject=CN = server`; drop the spaces.
    String::from_utf8_lossy(&out.stdout)
        .replace(' ', "")
        .trim()
        .to_string()
}

struct Wharf {
    child: Child,
    addr: String,
}

impl Drop for Wharf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, certs: &Path, upstream: &str) -> Wharf {
    let config = dir.join("wharf.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
             [storage]\ndir = \"{}\"\n[[upstream]]\nname = \"docker.io\"\nurl = \"{upstream}\"\ndefault = true\n",
            certs.join("server.crt").display(),
            certs.join("server.key").display(),
            dir.join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = common::listening_addr(&mut child);
    Wharf { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_skopeo_and_http2_and_reloads_on_sighup() {
    let fake = FakeUpstream::start(Options::default()).await;
    let img = fake.add_image(
        "library/secure",
        Some("1"),
        &[pseudo_random_bytes(7, 200_000)],
    );
    let dir = tempfile::tempdir().unwrap();
    let certs: PathBuf = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    issue(&certs, "server");
    let wharf = start(dir.path(), &certs, &fake.url());

    // skopeo trusts the test CA from a cert dir, and pulls over HTTPS.
    let cert_dir = dir.path().join("skopeo-certs");
    std::fs::create_dir(&cert_dir).unwrap();
    std::fs::copy(certs.join("ca.crt"), cert_dir.join("ca.crt")).unwrap();
    let out = Command::new("skopeo")
        .arg("inspect")
        .arg("--raw")
        .arg("--cert-dir")
        .arg(&cert_dir)
        .arg(format!("docker://{}/library/secure:1", wharf.addr))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, img.manifest.to_vec(), "manifest bytes over TLS");
    let copy_dir = dir.path().join("copy");
    let out = Command::new("skopeo")
        .arg("copy")
        .arg("--src-cert-dir")
        .arg(&cert_dir)
        .arg(format!("docker://{}/library/secure:1", wharf.addr))
        .arg(format!("dir:{}", copy_dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layer_hex = img.layers[0].0.strip_prefix("sha256:").unwrap();
    assert_eq!(
        std::fs::read(copy_dir.join(layer_hex)).unwrap(),
        img.layers[0].1.to_vec()
    );

    // Without the CA the handshake is refused: TLS is really on.
    let plain = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &format!("docker://{}/library/secure:1", wharf.addr),
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // ALPN offers HTTP/2.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.crt")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .no_proxy()
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://{}/v2/", wharf.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);

    // Swap the certificate on disk; SIGHUP; new handshakes get the new one.
    assert!(served_subject(&wharf.addr, &certs.join("ca.crt")).contains("CN=server"));
    issue(&certs, "renewed");
    std::fs::copy(certs.join("renewed.crt"), certs.join("server.crt")).unwrap();
    std::fs::copy(certs.join("renewed.key"), certs.join("server.key")).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &wharf.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let t0 = std::time::Instant::now();
    loop {
        let subject = served_subject(&wharf.addr, &certs.join("ca.crt"));
        if subject.contains("CN=renewed") {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "still serving {subject:?} after SIGHUP"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The connection opened before the swap still works.
    assert_eq!(
        client
            .get(format!("https://{}/v2/", wharf.addr))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn mismatched_tls_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[server]\ntls_cert = \"/nonexistent/cert.pem\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("server.tls_cert: tls_cert and tls_key go together"),
        "{text}"
    );
    assert!(
        text.contains("/nonexistent/cert.pem is not a readable file"),
        "{text}"
    );
}
