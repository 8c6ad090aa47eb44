//! Configuration: TOML text plus command-line overrides become one validated
//! [`Config`]. Every problem is reported at once, each naming its key.
//! Owns parsing and defaults only: it opens no sockets and touches no data.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use toml::{Table, Value};
use url::Url;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub cache: CacheConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    /// Repository rules, in file order: the first that matches decides.
    pub policy: Vec<PolicyRule>,
    pub upstreams: Vec<UpstreamConfig>,
}

/// Client authentication: who may pull from `require_auth` upstreams.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt entries (`htpasswd -B`).
    pub htpasswd: Option<PathBuf>,
    /// The realm named in the `WWW-Authenticate: Basic` challenge.
    pub realm: String,
}

/// Bounds on what clients and fills may take.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Open client connections; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slowloris).
    pub header_timeout: Duration,
    /// Bytes of request headers (431 beyond).
    pub max_header_size: usize,
    /// Bytes of request target, path and query (414 beyond).
    pub max_url_length: usize,
    /// Blob fills from upstream running at once (429 beyond).
    pub max_fills: usize,
    /// Requests in flight from one client IP address (429 beyond).
    pub client_requests: usize,
}

/// Whether a [`PolicyRule`] lets matching repositories through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// One `[[policy]]` table: glob patterns over `upstream/repository`.
#[derive(Debug, Clone)]
pub struct PolicyRule {
    pub name: String,
    pub effect: Effect,
    pub patterns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz` and `/readyz` live here, apart from the API.
    pub admin_listen: SocketAddr,
    /// How long in-flight responses may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// PEM certificate chain and key: the API is served over TLS when set.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub dir: PathBuf,
    /// Byte budget for blobs on disk.
    pub max_size: u64,
    /// Eviction starts above this fraction of `max_size`...
    pub high_watermark: f64,
    /// ...and stops at or below this one.
    pub low_watermark: f64,
    /// A bucket the fleet shares; the local dir then caches in front of it.
    pub s3: Option<S3Config>,
}

/// `[storage] backend = "s3"`: blobs shared by every replica in a bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, empty or ending in `/`.
    pub prefix: String,
    /// An S3-compatible endpoint (MinIO, Ceph, moto…); AWS when unset.
    pub endpoint: Option<Url>,
    pub region: String,
    /// One replica fetches a cold blob for the whole fleet; the others
    /// wait for it to appear in the bucket, up to `lease_ttl`.
    pub lease: bool,
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long a resolved tag is served without asking upstream.
    pub tag_ttl: Duration,
    /// How long past its last confirmation a tag may be served while upstream fails.
    pub stale_if_error: Duration,
    /// How long an upstream 404 is remembered.
    pub negative_ttl: Duration,
}

#[derive(Clone)]
pub struct UpstreamConfig {
    /// Matched against `?ns=` and a leading path component.
    pub name: String,
    pub url: Url,
    pub default: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Extra token-realm hosts that may receive this upstream's credentials.
    pub auth_realms: Vec<String>,
    pub connect_timeout: Duration,
    /// Time allowed until upstream's response headers arrive.
    pub response_timeout: Duration,
    /// Longest silence allowed inside a response body.
    pub read_timeout: Duration,
    /// Accept any TLS certificate from this upstream. Dangerous; logged loudly.
    pub insecure_skip_verify: bool,
    /// Clients must authenticate (`[auth]`) to pull through this upstream.
    pub require_auth: bool,
    /// Follow redirects to loopback, link-local and private addresses. Off
    /// unless the upstream itself is at such an address.
    pub allow_private_redirects: bool,
}

// Hand-written so the password never reaches a log line.
impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("default", &self.default)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("auth_realms", &self.auth_realms)
            .field("require_auth", &self.require_auth)
            .field("allow_private_redirects", &self.allow_private_redirects)
            .finish_non_exhaustive()
    }
}

impl UpstreamConfig {
    /// Docker Hub stores official images under `library/`; clients may omit it.
    pub fn adds_library_prefix(&self) -> bool {
        self.name == "docker.io"
    }

    /// Whether requests to this upstream carry `?ns=NAME`, as containerd's
    /// do to a mirror: when the URL is not the registry's own host, the
    /// upstream may be another mirror (a regional wharf) that serves many
    /// registries and needs to know which one is meant. Registries ignore
    /// query parameters they do not know.
    pub fn passes_ns(&self) -> bool {
        let host = self.url.host_str().unwrap_or("");
        let own_host =
            host == self.name || (self.name == "docker.io" && host == "registry-1.docker.io");
        !own_host
    }
}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub tag_ttl: Option<String>,
    pub max_size: Option<String>,
    /// `NAME=URL` pairs; when present they replace the configured upstreams.
    pub upstreams: Vec<String>,
}

/// One problem with the configuration, located by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub issues: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem(s)):",
            self.issues.len()
        )?;
        for issue in &self.issues {
            writeln!(f, "  {}: {}", issue.key, issue.message)?;
        }
        Ok(())
    }
}

const DEFAULT_UPSTREAMS: [(&str, &str); 4] = [
    ("docker.io", "https://registry-1.docker.io"),
    ("ghcr.io", "https://ghcr.io"),
    ("quay.io", "https://quay.io"),
    ("registry.k8s.io", "https://registry.k8s.io"),
];

impl Config {
    /// The embedded defaults: listen on :5000, data in ./wharf-data, mirror
    /// Docker Hub (the default), ghcr.io, quay.io and registry.k8s.io.
    pub fn defaults() -> Config {
        Config::load("", &Overrides::default()).expect("embedded defaults are valid")
    }

    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::load(text, &Overrides::default())
    }

    /// Parses `text` (may be empty), applies `overrides`, validates everything.
    pub fn load(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut r = Reader::default();
        let root: Table = match text.parse::<Table>() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError {
                    issues: vec![ConfigIssue {
                        key: "(file)".into(),
                        message: format!("not valid TOML: {}", e.message()),
                    }],
                })
            }
        };
        r.unknown_keys(
            &root,
            "",
            &[
                "server", "storage", "cache", "auth", "limits", "policy", "upstream",
            ],
        );

        let server = r.table(&root, "server");
        r.unknown_keys(
            server,
            "server.",
            &[
                "listen",
                "admin_listen",
                "shutdown_grace",
                "tls_cert",
                "tls_key",
            ],
        );
        let listen = r.address(
            server,
            "server.listen",
            overrides.listen.as_deref(),
            "0.0.0.0:5000",
        );
        let admin_listen = r.address(
            server,
            "server.admin_listen",
            overrides.admin_listen.as_deref(),
            "127.0.0.1:9090",
        );
        let shutdown_grace = r
            .duration(server, "server.shutdown_grace")
            .unwrap_or(Duration::from_secs(30));
        let tls_cert = r.string(server, "server.tls_cert").map(PathBuf::from);
        let tls_key = r.string(server, "server.tls_key").map(PathBuf::from);
        if tls_cert.is_some() != tls_key.is_some() {
            r.issue("server.tls_cert", "tls_cert and tls_key go together");
        }
        for (key, path) in [("server.tls_cert", &tls_cert), ("server.tls_key", &tls_key)] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
                r.issue(key, format!("{} is not a readable file", path.display()));
            }
        }
        let storage = r.table(&root, "storage");
        r.unknown_keys(
            storage,
            "storage.",
            &[
                "dir",
                "max_size",
                "high_watermark",
                "low_watermark",
                "backend",
                "bucket",
                "prefix",
                "endpoint",
                "region",
                "lease",
                "lease_ttl",
            ],
        );
        let s3 = r.s3(storage);
        let dir = overrides
            .data_dir
            .clone()
            .or_else(|| r.string(storage, "storage.dir").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("./wharf-data"));
        let max_size = match &overrides.max_size {
            Some(text) => r.parse_with("storage.max_size", text, parse_size),
            None => match storage.get("max_size") {
                Some(Value::Integer(n)) if *n > 0 => Some(*n as u64),
                Some(Value::String(text)) => r.parse_with("storage.max_size", text, parse_size),
                Some(_) => {
                    r.issue("storage.max_size", "expected a size such as \"20GiB\"");
                    None
                }
                None => None,
            },
        }
        .unwrap_or(20 << 30);
        let high_watermark = r.fraction(storage, "storage.high_watermark").unwrap_or(0.9);
        let low_watermark = r.fraction(storage, "storage.low_watermark").unwrap_or(0.8);
        if low_watermark >= high_watermark {
            r.issue(
                "storage.low_watermark",
                format!("must be below high_watermark ({low_watermark} >= {high_watermark})"),
            );
        }

        let cache = r.table(&root, "cache");
        r.unknown_keys(
            cache,
            "cache.",
            &["tag_ttl", "stale_if_error", "negative_ttl"],
        );
        let tag_ttl = match &overrides.tag_ttl {
            Some(text) => r.parse_with("cache.tag_ttl", text, parse_duration),
            None => r.duration(cache, "cache.tag_ttl"),
        }
        .unwrap_or(Duration::from_secs(300));
        let stale_if_error = r
            .duration(cache, "cache.stale_if_error")
            .unwrap_or(Duration::from_secs(24 * 3600));
        let negative_ttl = r
            .duration(cache, "cache.negative_ttl")
            .unwrap_or(Duration::from_secs(5));

        let auth = r.auth(&root);
        let limits = r.limits(&root);
        let policy = r.policy(&root);

        let upstreams = if !overrides.upstreams.is_empty() {
            r.flag_upstreams(&overrides.upstreams)
        } else if root.contains_key("upstream") {
            r.file_upstreams(&root)
        } else {
            DEFAULT_UPSTREAMS
                .iter()
                .enumerate()
                .map(|(i, (name, url))| {
                    UpstreamConfig::new(name, Url::parse(url).expect("default url"), i == 0)
                })
                .collect()
        };
        r.check_upstream_set(&upstreams);
        r.check_access(&auth, &policy, &upstreams);

        if !r.issues.is_empty() {
            return Err(ConfigError { issues: r.issues });
        }
        Ok(Config {
            server: ServerConfig {
                listen: listen.expect("no issue means listen parsed"),
                admin_listen: admin_listen.expect("no issue means admin_listen parsed"),
                shutdown_grace,
                tls_cert,
                tls_key,
            },
            storage: StorageConfig {
                dir,
                max_size,
                high_watermark,
                low_watermark,
                s3,
            },
            cache: CacheConfig {
                tag_ttl,
                stale_if_error,
                negative_ttl,
            },
            auth,
            limits,
            policy,
            upstreams,
        })
    }

    pub fn default_upstream(&self) -> &UpstreamConfig {
        self.upstreams
            .iter()
            .find(|u| u.default)
            .expect("validation guarantees one default upstream")
    }
}

impl UpstreamConfig {
    fn new(name: &str, url: Url, default: bool) -> UpstreamConfig {
        UpstreamConfig {
            name: name.to_owned(),
            default,
            username: None,
            password: None,
            ca_file: None,
            auth_realms: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            insecure_skip_verify: false,
            require_auth: false,
            allow_private_redirects: is_private_host(&url),
            url,
        }
    }
}

/// Whether `url` names loopback, a private or link-local network, or a
/// name that only resolves locally.
pub fn is_private_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => is_private_ip(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => is_private_ip(std::net::IpAddr::V6(ip)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost"
                || !name.contains('.')
                || [".localhost", ".local", ".internal", ".lan", ".home.arpa"]
                    .iter()
                    .any(|suffix| name.ends_with(suffix))
        }
        None => false,
    }
}

/// Loopback, private (RFC 1918, ULA), link-local, CGNAT, unspecified and
/// other addresses no public registry redirects to.
pub fn is_private_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        std::net::IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            match v6.to_ipv4_mapped() {
                Some(v4) => is_private_ip(std::net::IpAddr::V4(v4)),
                None => {
                    v6.is_loopback()
                        || v6.is_unspecified()
                        || v6.is_multicast()
                        || (first & 0xfe00) == 0xfc00
                        || (first & 0xffc0) == 0xfe80
                }
            }
        }
    }
}

/// Parses `5m`, `24h`, `30s`, `1h 30m`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; expected a duration such as \"30s\", \"5m\" or \"24h\""))
}

/// Parses `20GiB`, `512MiB`, `10GB`, `1048576`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000_u64.pow(2),
        "gb" => 1000_u64.pow(3),
        "tb" => 1000_u64.pow(4),
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err("unknown unit; expected B, KiB, MiB, GiB, TiB, KB, MB, GB or TB".into()),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| "expected a size such as \"20GiB\" or \"500MB\"".to_string())?;
    let bytes = value * multiplier as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err("must be at least one byte".into());
    }
    Ok(bytes as u64)
}

#[derive(Default)]
struct Reader {
    issues: Vec<ConfigIssue>,
}

static EMPTY: std::sync::OnceLock<Table> = std::sync::OnceLock::new();

impl Reader {
    fn issue(&mut self, key: &str, message: impl Into<String>) {
        self.issues.push(ConfigIssue {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn table<'a>(&mut self, parent: &'a Table, key: &str) -> &'a Table {
        match parent.get(key) {
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.issue(key, format!("expected a table, found {}", other.type_str()));
                EMPTY.get_or_init(Table::new)
            }
            None => EMPTY.get_or_init(Table::new),
        }
    }

    fn unknown_keys(&mut self, table: &Table, prefix: &str, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                self.issue(
                    &format!("{prefix}{key}"),
                    format!("unknown key; expected one of: {}", known.join(", ")),
                );
            }
        }
    }

    /// Reads `path`'s last segment from `table` as a string.
    fn string(&mut self, table: &Table, path: &str) -> Option<String> {
        let key = path.rsplit('.').next().expect("split yields one part");
        match table.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.issue(
                    path,
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn bool(&mut self, table: &Table, path: &str) -> Option<bool> {
        let key = path.rsplit('.').next().expect("split yields one part");
        match table.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.issue(
                    path,
                    format!("expected true or false, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// `"90%"` or `0.9`: a fraction in (0, 1].
    fn fraction(&mut self, table: &Table, path: &str) -> Option<f64> {
        let key = path.rsplit('.').next().expect("split yields one part");
        let value = match table.get(key)? {
            Value::Float(f) => Some(*f),
            Value::String(s) => s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .map(|p| p / 100.0),
            _ => None,
        };
        match value {
            Some(f) if f > 0.0 && f <= 1.0 => Some(f),
            _ => {
                self.issue(
                    path,
                    "expected a percentage such as \"90%\" (or a fraction such as 0.9)",
                );
                None
            }
        }
    }

    fn duration(&mut self, table: &Table, path: &str) -> Option<Duration> {
        let text = self.string(table, path)?;
        self.parse_with(path, &text, parse_duration)
    }

    fn parse_with<T>(
        &mut self,
        path: &str,
        text: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.issue(path, format!("{text:?}: {message}"));
                None
            }
        }
    }

    fn url(&mut self, path: &str, text: &str) -> Option<Url> {
        self.parse_with(path, text, |s| {
            let url = Url::parse(s).map_err(|e| e.to_string())?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err("expected an http:// or https:// URL with a host".into());
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err("the URL must not carry a query or fragment".into());
            }
            Ok(url)
        })
    }

    /// A listen address: the flag, else the file, else `default`.
    fn address(
        &mut self,
        table: &Table,
        path: &str,
        flag: Option<&str>,
        default: &str,
    ) -> Option<SocketAddr> {
        let text = match flag {
            Some(text) => text.to_owned(),
            None => self
                .string(table, path)
                .unwrap_or_else(|| default.to_owned()),
        };
        self.parse_with(path, &text, |s| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("{e}; expected HOST:PORT such as {default}"))
        })
    }

    /// A positive whole number.
    fn count(&mut self, table: &Table, path: &str) -> Option<usize> {
        let key = path.rsplit('.').next().expect("split yields one part");
        match table.get(key)? {
            Value::Integer(n) if *n > 0 => Some(*n as usize),
            other => {
                self.issue(
                    path,
                    format!("expected a positive whole number, found {other}"),
                );
                None
            }
        }
    }

    /// A byte size: a number, or a string such as "32KiB".
    fn size(&mut self, table: &Table, path: &str) -> Option<u64> {
        let key = path.rsplit('.').next().expect("split yields one part");
        match table.get(key)? {
            Value::Integer(n) if *n > 0 => Some(*n as u64),
            Value::String(text) => self.parse_with(path, text, parse_size),
            _ => {
                self.issue(path, "expected a size such as \"32KiB\"");
                None
            }
        }
    }

    /// The bucket settings of `[storage]`, when `backend = "s3"`.
    fn s3(&mut self, storage: &Table) -> Option<S3Config> {
        let backend = self
            .string(storage, "storage.backend")
            .unwrap_or_else(|| "disk".into());
        let s3_keys = [
            "bucket",
            "prefix",
            "endpoint",
            "region",
            "lease",
            "lease_ttl",
        ];
        match backend.as_str() {
            "disk" => {
                for key in s3_keys.iter().filter(|k| storage.contains_key(**k)) {
                    self.issue(&format!("storage.{key}"), "only used with backend = \"s3\"");
                }
                return None;
            }
            "s3" => {}
            other => {
                self.issue(
                    "storage.backend",
                    format!("{other:?}: expected \"disk\" or \"s3\""),
                );
                return None;
            }
        }
        let bucket = self.string(storage, "storage.bucket");
        if bucket.as_deref().is_none_or(str::is_empty) {
            self.issue("storage.bucket", "required with backend = \"s3\"");
        }
        let mut prefix = self.string(storage, "storage.prefix").unwrap_or_default();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        if prefix.split('/').any(|part| part == "..") || prefix.starts_with('/') {
            self.issue(
                "storage.prefix",
                "must be a relative key prefix such as \"wharf/\"",
            );
        }
        let endpoint = self
            .string(storage, "storage.endpoint")
            .and_then(|text| self.url("storage.endpoint", &text));
        let region = self
            .string(storage, "storage.region")
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let lease = self.bool(storage, "storage.lease").unwrap_or(false);
        let lease_ttl = self
            .duration(storage, "storage.lease_ttl")
            .unwrap_or(Duration::from_secs(120));
        Some(S3Config {
            bucket: bucket?,
            prefix,
            endpoint,
            region,
            lease,
            lease_ttl,
        })
    }

    fn auth(&mut self, root: &Table) -> AuthConfig {
        let auth = self.table(root, "auth");
        self.unknown_keys(auth, "auth.", &["htpasswd", "realm"]);
        let htpasswd = self.string(auth, "auth.htpasswd").map(PathBuf::from);
        if let Some(path) = htpasswd.as_ref().filter(|p| !p.is_file()) {
            self.issue(
                "auth.htpasswd",
                format!("{} is not a readable file", path.display()),
            );
        }
        let realm = self
            .string(auth, "auth.realm")
            .unwrap_or_else(|| "wharf".into());
        if realm.is_empty() || realm.contains(['"', '\\']) || realm.chars().any(char::is_control) {
            self.issue(
                "auth.realm",
                "must be non-empty, without quotes, backslashes or control characters",
            );
        }
        AuthConfig { htpasswd, realm }
    }

    fn limits(&mut self, root: &Table) -> LimitsConfig {
        let t = self.table(root, "limits");
        self.unknown_keys(
            t,
            "limits.",
            &[
                "max_connections",
                "header_timeout",
                "max_header_size",
                "max_url_length",
                "max_fills",
                "client_requests",
            ],
        );
        let max_header_size = self.size(t, "limits.max_header_size").unwrap_or(32 << 10);
        let max_url_length = self.size(t, "limits.max_url_length").unwrap_or(8 << 10);
        for (key, value, floor) in [
            ("limits.max_header_size", max_header_size, 1024),
            ("limits.max_url_length", max_url_length, 512),
        ] {
            if !(floor..=1 << 20).contains(&value) {
                self.issue(
                    key,
                    format!("{value} is out of range; expected {floor} bytes to 1MiB"),
                );
            }
        }
        LimitsConfig {
            max_connections: self.count(t, "limits.max_connections").unwrap_or(4096),
            header_timeout: self
                .duration(t, "limits.header_timeout")
                .unwrap_or(Duration::from_secs(10)),
            max_header_size: max_header_size as usize,
            max_url_length: max_url_length as usize,
            max_fills: self.count(t, "limits.max_fills").unwrap_or(128),
            client_requests: self.count(t, "limits.client_requests").unwrap_or(128),
        }
    }

    /// The tables of `[[key]]`, each with its key prefix (`key[i]`).
    fn tables<'a>(&mut self, root: &'a Table, key: &str) -> Vec<(String, &'a Table)> {
        let entries = match root.get(key) {
            None => return Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(_) => {
                self.issue(key, format!("expected [[{key}]] tables"));
                return Vec::new();
            }
        };
        let mut tables = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let prefix = format!("{key}[{i}]");
            match entry {
                Value::Table(t) => tables.push((prefix, t)),
                _ => self.issue(&prefix, "expected a table"),
            }
        }
        tables
    }

    fn policy(&mut self, root: &Table) -> Vec<PolicyRule> {
        let mut rules = Vec::new();
        for (prefix, t) in self.tables(root, "policy") {
            self.unknown_keys(t, &format!("{prefix}."), &["name", "allow", "deny"]);
            let name = self
                .string(t, &format!("{prefix}.name"))
                .unwrap_or_else(|| prefix.clone());
            let (effect, key) = match (t.contains_key("allow"), t.contains_key("deny")) {
                (true, false) => (Effect::Allow, "allow"),
                (false, true) => (Effect::Deny, "deny"),
                _ => {
                    self.issue(
                        &prefix,
                        "needs exactly one of allow = [...] or deny = [...]",
                    );
                    continue;
                }
            };
            let key = format!("{prefix}.{key}");
            let patterns: Vec<String> = match t.get(key.rsplit('.').next().expect("key")) {
                Some(Value::Array(items))
                    if !items.is_empty() && items.iter().all(Value::is_str) =>
                {
                    items
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                }
                _ => {
                    self.issue(
                        &key,
                        "expected a non-empty list of patterns such as \"docker.io/library/*\"",
                    );
                    continue;
                }
            };
            for pattern in &patterns {
                if let Err(message) = crate::access::policy::check_pattern(pattern) {
                    self.issue(&key, format!("{pattern:?}: {message}"));
                }
            }
            rules.push(PolicyRule {
                name,
                effect,
                patterns,
            });
        }
        rules
    }

    /// Cross-table checks: `require_auth` needs `[auth]`, and a policy
    /// pattern must be able to match some configured upstream.
    fn check_access(
        &mut self,
        auth: &AuthConfig,
        policy: &[PolicyRule],
        upstreams: &[UpstreamConfig],
    ) {
        for (i, u) in upstreams.iter().enumerate() {
            if u.require_auth && auth.htpasswd.is_none() {
                self.issue(
                    &format!("upstream[{i}].require_auth"),
                    "needs [auth] htpasswd = \"FILE\" to check clients against",
                );
            }
        }
        for (i, rule) in policy.iter().enumerate() {
            for pattern in &rule.patterns {
                let first = pattern.split('/').next().unwrap_or("");
                let names_upstream = crate::access::policy::check_pattern(first).is_ok()
                    && upstreams
                        .iter()
                        .any(|u| crate::access::policy::glob_matches(first, &u.name));
                if !names_upstream {
                    self.issue(
                        &format!("policy[{i}]"),
                        format!("{pattern:?} matches no configured upstream; patterns look like \"UPSTREAM/REPOSITORY\", e.g. \"docker.io/library/*\""),
                    );
                }
            }
        }
    }

    fn flag_upstreams(&mut self, pairs: &[String]) -> Vec<UpstreamConfig> {
        let mut out = Vec::new();
        for (i, pair) in pairs.iter().enumerate() {
            let key = format!("--upstream[{i}]");
            let Some((name, url)) = pair.split_once('=') else {
                self.issue(&key, format!("{pair:?}: expected NAME=URL"));
                continue;
            };
            if let Some(url) = self.url(&key, url) {
                out.push(UpstreamConfig::new(name, url, i == 0));
            }
        }
        out
    }

    fn file_upstreams(&mut self, root: &Table) -> Vec<UpstreamConfig> {
        let mut out = Vec::new();
        for (prefix, t) in self.tables(root, "upstream") {
            self.unknown_keys(
                t,
                &format!("{prefix}."),
                &[
                    "name",
                    "url",
                    "default",
                    "username",
                    "password",
                    "password_env",
                    "ca_file",
                    "auth_realms",
                    "connect_timeout",
                    "response_timeout",
                    "read_timeout",
                    "insecure_skip_verify",
                    "require_auth",
                    "allow_private_redirects",
                ],
            );
            let key = |k: &str| format!("{prefix}.{k}");
            let name = self.string(t, &key("name"));
            if name.is_none() && !t.contains_key("name") {
                self.issue(&key("name"), "missing; every upstream needs a name");
            }
            let url = match self.string(t, &key("url")) {
                Some(text) => self.url(&key("url"), &text),
                None => {
                    if !t.contains_key("url") {
                        self.issue(&key("url"), "missing; every upstream needs a url");
                    }
                    None
                }
            };
            let default = self.bool(t, &key("default")).unwrap_or(false);
            let insecure_skip_verify = self.bool(t, &key("insecure_skip_verify")).unwrap_or(false);
            let require_auth = self.bool(t, &key("require_auth")).unwrap_or(false);
            let allow_private_redirects = self.bool(t, &key("allow_private_redirects"));
            let username = self.string(t, &key("username"));
            let password = self.password(t, &prefix);
            if password.is_some() != username.is_some() {
                self.issue(
                    &key("username"),
                    "username and password (or password_env) go together",
                );
            }
            let ca_file = self.string(t, &key("ca_file")).map(PathBuf::from);
            if let Some(path) = &ca_file {
                if !path.is_file() {
                    self.issue(
                        &key("ca_file"),
                        format!("{} is not a readable file", path.display()),
                    );
                }
            }
            let auth_realms = match t.get("auth_realms") {
                None => Vec::new(),
                Some(Value::Array(hosts)) if hosts.iter().all(Value::is_str) => hosts
                    .iter()
                    .filter_map(|h| h.as_str().map(str::to_owned))
                    .collect(),
                Some(_) => {
                    self.issue(&key("auth_realms"), "expected a list of host names");
                    Vec::new()
                }
            };
            let mut upstream = match (name, url) {
                (Some(name), Some(url)) => UpstreamConfig::new(&name, url, default),
                _ => continue,
            };
            upstream.username = username;
            upstream.password = password;
            upstream.ca_file = ca_file;
            upstream.auth_realms = auth_realms;
            upstream.insecure_skip_verify = insecure_skip_verify;
            upstream.require_auth = require_auth;
            if let Some(allow) = allow_private_redirects {
                upstream.allow_private_redirects = allow;
            }
            for (k, slot) in [
                ("connect_timeout", &mut upstream.connect_timeout),
                ("response_timeout", &mut upstream.response_timeout),
                ("read_timeout", &mut upstream.read_timeout),
            ] {
                if let Some(d) = self.duration(t, &key(k)) {
                    *slot = d;
                }
            }
            out.push(upstream);
        }
        out
    }

    fn password(&mut self, t: &Table, prefix: &str) -> Option<String> {
        let inline = self.string(t, &format!("{prefix}.password"));
        let from_env = self.string(t, &format!("{prefix}.password_env"));
        match (inline, from_env) {
            (Some(_), Some(_)) => {
                self.issue(
                    &format!("{prefix}.password_env"),
                    "set either password or password_env, not both",
                );
                None
            }
            (Some(p), None) => Some(p),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.issue(
                        &format!("{prefix}.password_env"),
                        format!("environment variable {var} is not set"),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn check_upstream_set(&mut self, upstreams: &[UpstreamConfig]) {
        if upstreams.is_empty() {
            if self.issues.is_empty() {
                self.issue("upstream", "at least one upstream is required");
            }
            return;
        }
        let defaults = upstreams.iter().filter(|u| u.default).count();
        if defaults != 1 {
            self.issue(
                "upstream",
                format!("exactly one upstream must have default = true, found {defaults}"),
            );
        }
        for (i, u) in upstreams.iter().enumerate() {
            if !crate::api::route::is_valid_name_component(&u.name) {
                self.issue(
                    &format!("upstream[{i}].name"),
                    format!(
                        "{:?} must be a registry host name such as docker.io (lowercase letters, digits, '.', '-')",
                        u.name
                    ),
                );
            }
            if upstreams[..i].iter().any(|o| o.name == u.name) {
                self.issue(
                    &format!("upstream[{i}].name"),
                    format!("{:?} is used twice", u.name),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_embedded_defaults() {
        let c = Config::defaults();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.storage.dir, PathBuf::from("./wharf-data"));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
        let names: Vec<_> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            ["docker.io", "ghcr.io", "quay.io", "registry.k8s.io"]
        );
        assert_eq!(
            c.default_upstream().url.as_str(),
            "https://registry-1.docker.io/"
        );
    }

    #[test]
    fn reads_every_documented_key() {
        std::env::set_var("WHARF_TEST_PW", "s3cret");
        let c = Config::from_toml_str(
            r#"
            [server]
            listen = "127.0.0.1:6000"
            [storage]
            dir = "/var/lib/wharf"
            [cache]
            tag_ttl = "1m"
            stale_if_error = "2h"
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            username = "me"
            password_env = "WHARF_TEST_PW"
            auth_realms = ["auth.docker.io"]
            response_timeout = "5s"
            [[upstream]]
            name = "local.test"
            url = "http://127.0.0.1:5001"
            "#,
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 6000);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.cache.stale_if_error, Duration::from_secs(7200));
        let hub = &c.upstreams[0];
        assert_eq!(hub.password.as_deref(), Some("s3cret"));
        assert_eq!(hub.response_timeout, Duration::from_secs(5));
        assert!(!format!("{hub:?}").contains("s3cret"));
        assert!(!c.upstreams[1].default);
    }

    #[test]
    fn reports_every_error_with_its_key() {
        let err = Config::from_toml_str(
            r#"
            [server]
            listen = "nowhere"
            colour = "blue"
            [cache]
            tag_ttl = "soon"
            [[upstream]]
            name = "Bad Name"
            url = "ftp://x"
            [[upstream]]
            url = "http://ok"
            default = "yes"
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.issues.iter().map(|i| i.key.as_str()).collect();
        for expected in [
            "server.listen",
            "server.colour",
            "cache.tag_ttl",
            "upstream[0].url",
            "upstream[1].name",
            "upstream[1].default",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let c = Config::load(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nname = \"a.io\"\nurl = \"http://a\"\ndefault = true\n",
            &Overrides {
                listen: Some("127.0.0.1:2".into()),
                admin_listen: None,
                data_dir: Some("/tmp/x".into()),
                tag_ttl: Some("10s".into()),
                max_size: Some("1GiB".into()),
                upstreams: vec!["b.io=http://b".into(), "c.io=http://c".into()],
            },
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 2);
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(10));
        assert_eq!(c.storage.max_size, 1 << 30);
        assert_eq!(c.default_upstream().name, "b.io");
        assert_eq!(c.upstreams.len(), 2);
    }

    #[test]
    fn sizes_and_watermarks() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1.5 MiB"), Ok(3 << 19));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 parsecs").is_err());
        let c = Config::from_toml_str(
            "[storage]\nmax_size = 1000\nhigh_watermark = \"95%\"\nlow_watermark = 0.5\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.storage.max_size,
                c.storage.high_watermark,
                c.storage.low_watermark
            ),
            (1000, 0.95, 0.5)
        );
        let err =
            Config::from_toml_str("[storage]\nhigh_watermark = \"50%\"\nlow_watermark = \"60%\"\n")
                .unwrap_err();
        assert_eq!(err.issues[0].key, "storage.low_watermark");
        let err = Config::from_toml_str("[storage]\nmax_size = \"big\"\nhigh_watermark = 2.0\n")
            .unwrap_err();
        let keys: Vec<_> = err.issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["storage.max_size", "storage.high_watermark"]);
    }

    #[test]
    fn reads_access_and_limits() {
        let dir = tempfile_dir();
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, "").unwrap();
        let c = Config::from_toml_str(&format!(
            r#"
            [auth]
            htpasswd = "{}"
            [limits]
            max_connections = 10
            header_timeout = "2s"
            max_header_size = "4KiB"
            max_url_length = 1024
            max_fills = 3
            client_requests = 7
            [[policy]]
            name = "no-test"
            deny = ["docker.io/*/test-*"]
            [[policy]]
            allow = ["**"]
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            require_auth = true
            [[upstream]]
            name = "local.test"
            url = "http://10.1.2.3:5000"
            "#,
            htpasswd.display()
        ))
        .unwrap();
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.header_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.max_header_size, 4096);
        assert_eq!((c.limits.max_fills, c.limits.client_requests), (3, 7));
        assert_eq!(c.policy[0].name, "no-test");
        assert_eq!(c.policy[1].name, "policy[1]");
        assert_eq!(c.policy[1].effect, Effect::Allow);
        assert!(c.upstreams[0].require_auth);
        assert!(!c.upstreams[0].allow_private_redirects);
        assert!(c.upstreams[1].allow_private_redirects);
    }

    #[test]
    fn access_errors_name_their_keys() {
        let err = Config::from_toml_str(
            r#"
            [auth]
            realm = "a\"b"
            [limits]
            max_fills = 0
            max_header_size = "10"
            [[policy]]
            deny = ["Docker.io/x"]
            [[policy]]
            allow = ["nowhere.example/x"]
            [[policy]]
            allow = ["docker.io/x"]
            deny = ["docker.io/y"]
            [[upstream]]
            name = "docker.io"
            url = "https://registry-1.docker.io"
            default = true
            require_auth = true
            "#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.issues.iter().map(|i| i.key.as_str()).collect();
        for expected in [
            "auth.realm",
            "limits.max_fills",
            "limits.max_header_size",
            "policy[0].deny",
            "policy[1]",
            "policy[2]",
            "upstream[0].require_auth",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn private_hosts() {
        for private in [
            "http://127.0.0.1:5000",
            "http://10.0.0.1",
            "http://[::1]:5000",
            "http://169.254.169.254",
            "http://localhost:5000",
            "http://registry.internal",
            "http://registry",
        ] {
            assert!(is_private_host(&Url::parse(private).unwrap()), "{private}");
        }
        for public in [
            "https://registry-1.docker.io",
            "https://8.8.8.8",
            "https://ghcr.io",
        ] {
            assert!(!is_private_host(&Url::parse(public).unwrap()), "{public}");
        }
        assert!(is_private_ip("::ffff:192.168.1.1".parse().unwrap()));
        assert!(is_private_ip("100.64.0.1".parse().unwrap()));
        assert!(is_private_ip("fd00::1".parse().unwrap()));
    }

    #[test]
    fn ns_goes_to_mirrors_not_to_registries_themselves() {
        let c = Config::defaults();
        assert!(c.upstreams.iter().all(|u| !u.passes_ns()));
        let regional = UpstreamConfig::new(
            "ghcr.io",
            Url::parse("http://wharf.region:5000").unwrap(),
            false,
        );
        assert!(regional.passes_ns());
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wharf-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rejects_two_defaults_and_duplicates() {
        let err = Config::from_toml_str(
            "[[upstream]]\nname = \"a.io\"\nurl = \"http://a\"\ndefault = true\n[[upstream]]\nname = \"a.io\"\nurl = \"http://b\"\ndefault = true\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exactly one upstream"), "{text}");
        assert!(text.contains("used twice"), "{text}");
    }
}

#[cfg(test)]
mod documented_example {
    use super::*;

    /// config/wharf.toml documents the defaults; keep the two in step.
    #[test]
    fn shipped_example_equals_the_embedded_defaults() {
        let shipped = Config::from_toml_str(include_str!("../config/wharf.toml")).unwrap();
        let defaults = Config::defaults();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }
}
