//! The command line: clap definitions and what each command does with the
//! library. `main.rs` only parses, sets up logging and calls [`run`].

use crate::config::{Config, Overrides};
use clap::{Args, Parser, Subcommand};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    version,
    about = "A pull-through caching proxy for container registries"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` or `json`; filter with RUST_LOG (e.g. `info,wharf::upstream=debug`).
    #[arg(long, global = true, default_value = "text", env = "WHARF_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the configuration comes from: a file, then flags on top.
#[derive(Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, global = true, env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Where blobs, manifests and the index live.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// NAME=URL; repeatable; replaces the configured upstreams; the first is the default.
    #[arg(long = "upstream", global = true, value_name = "NAME=URL")]
    upstreams: Vec<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy (defaults: 0.0.0.0:5000, ./wharf-data, mirrors Docker Hub, ghcr.io, quay.io, registry.k8s.io).
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Address to listen on, e.g. 0.0.0.0:5000.
        #[arg(long)]
        listen: Option<String>,
        /// Address for /metrics, /healthz and /readyz, e.g. 0.0.0.0:9090.
        #[arg(long)]
        admin_listen: Option<String>,
        /// How long a tag is served without asking upstream, e.g. 5m.
        #[arg(long)]
        tag_ttl: Option<String>,
        /// Byte budget for cached blobs, e.g. 20GiB.
        #[arg(long)]
        max_size: Option<String>,
    },
    /// Validate a configuration file and report every problem.
    CheckConfig { file: PathBuf },
    /// Inspect or clean a data dir (refuses while `wharf serve` uses it).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Pre-pull images into the cache: through a running wharf (--registry),
    /// or straight into a data dir (--data-dir / --config, wharf not running).
    Warm {
        /// Images such as alpine:3.20, ghcr.io/org/app:v1, library/x@sha256:…
        images: Vec<String>,
        /// A file with one image per line (# comments allowed).
        #[arg(long)]
        file: Option<PathBuf>,
        /// A running wharf, e.g. http://127.0.0.1:5000.
        #[arg(long)]
        registry: Option<String>,
        /// Platforms to warm from multi-arch images (repeatable); default: this machine's.
        #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
        platforms: Vec<String>,
        /// Warm every platform of multi-arch images.
        #[arg(long, conflicts_with = "platforms")]
        all_platforms: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
pub enum CacheAction {
    /// Cached tags: digest, cached bytes, last confirmed upstream, last read.
    Ls,
    /// Bytes, blob count, and the last serve run's hit ratio.
    Stats,
    /// Remove REPO[:TAG] (with what only it uses), or everything unused for --older-than.
    Purge {
        /// `[upstream/]repo[:tag]`, e.g. library/alpine:3.19 or ghcr.io/org/app.
        target: Option<String>,
        /// e.g. 30d: remove blobs not read and tags not confirmed for this long.
        #[arg(long)]
        older_than: Option<String>,
    },
    /// Re-hash every blob and manifest; move corrupt files to quarantine/.
    Verify,
}

pub fn run(command: Command) -> ExitCode {
    let result = match command {
        Command::CheckConfig { file } => load(Some(&file), &Overrides::default())
            .and_then(|config| {
                crate::access::Access::new(&config)
                    .map_err(|e| format!("{}: auth.htpasswd: {e}", file.display()))
            })
            .map(|_| println!("{}: ok", file.display())),
        Command::Serve {
            config,
            listen,
            admin_listen,
            tag_ttl,
            max_size,
        } => {
            let overrides = Overrides {
                listen,
                admin_listen,
                data_dir: config.data_dir,
                tag_ttl,
                max_size,
                upstreams: config.upstreams,
            };
            match load(config.config.as_deref(), &overrides) {
                Ok(config) => return serve(config),
                Err(message) => {
                    eprintln!("{message}");
                    return ExitCode::from(2);
                }
            }
        }
        Command::Cache { action, config } => config
            .resolve()
            .and_then(|config| cache_command(&config.storage.dir, action)),
        Command::Warm {
            images,
            file,
            registry,
            platforms,
            all_platforms,
            config,
        } => warm(images, file, registry, platforms, all_platforms, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("wharf: {message}");
            ExitCode::FAILURE
        }
    }
}

impl ConfigArgs {
    fn resolve(self) -> Result<Config, String> {
        let overrides = Overrides {
            data_dir: self.data_dir,
            upstreams: self.upstreams,
            ..Overrides::default()
        };
        load(self.config.as_deref(), &overrides)
    }
}

fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, String> {
    let text = match file {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => String::new(),
    };
    Config::load(&text, overrides).map_err(|e| match file {
        Some(path) => format!("{}: {e}", path.display()),
        None => e.to_string(),
    })
}

fn cache_command(dir: &Path, action: CacheAction) -> Result<(), String> {
    let admin = crate::admin::Admin::open(dir).map_err(|e| e.to_string())?;
    let text = match action {
        CacheAction::Ls => admin.ls().map_err(|e| e.to_string())?,
        CacheAction::Stats => admin.stats().map_err(|e| e.to_string())?,
        CacheAction::Verify => {
            let report = admin.verify().map_err(|e| e.to_string())?;
            let mut text = format!("{} file(s) verified\n", report.good);
            for path in &report.quarantined {
                text.push_str(&format!("corrupt, moved to {}\n", path.display()));
            }
            text
        }
        CacheAction::Purge { target, older_than } => {
            let purged = match (target, older_than) {
                (Some(target), None) => admin.purge_repo(&target),
                (None, Some(age)) => {
                    let age = crate::config::parse_duration(&age)
                        .map_err(|e| format!("--older-than {age:?}: {e}"))?;
                    admin.purge_older_than(age)
                }
                _ => return Err("purge takes either REPO[:TAG] or --older-than DURATION".into()),
            }
            .map_err(|e| e.to_string())?;
            format!(
                "removed {} tag(s), {} manifest(s), {} blob(s), {}\n",
                purged.tags,
                purged.manifests,
                purged.blobs,
                crate::admin::human_bytes(purged.bytes)
            )
        }
    };
    print!("{text}");
    Ok(())
}

#[tokio::main]
async fn serve(config: Config) -> ExitCode {
    let server = match crate::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("wharf: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests read the bound ports from these lines (e.g. with
    // --listen 127.0.0.1:0). A reader that hangs up early must not kill us.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "wharf listening on {}", server.local_addr());
    let _ = writeln!(
        stdout,
        "wharf admin (metrics, health) on {}",
        server.admin_addr()
    );
    let _ = stdout.flush();
    tokio::spawn(reload_on_sighup(server.tls(), server.access()));
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

/// Re-reads the TLS certificate and key and the htpasswd file on every SIGHUP.
async fn reload_on_sighup(
    tls: Option<Arc<crate::server::tls::TlsFiles>>,
    access: Arc<crate::access::Access>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        match tls.as_ref().map(|tls| tls.reload()) {
            None => {}
            Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Some(Err(e)) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate")
            }
        }
        match access.reload() {
            Ok(None) => {}
            Ok(Some(users)) => tracing::info!(users, "SIGHUP: htpasswd reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: htpasswd reload failed; keeping the old users")
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn warm(
    mut images: Vec<String>,
    file: Option<PathBuf>,
    registry: Option<String>,
    platforms: Vec<String>,
    all_platforms: bool,
    config: ConfigArgs,
) -> Result<(), String> {
    if let Some(file) = file {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        images.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_owned),
        );
    }
    if images.is_empty() {
        return Err("name images to warm, or --file LIST".into());
    }
    let images = images
        .iter()
        .map(|i| crate::warm::parse_image(i))
        .collect::<Result<Vec<_>, _>>()?;
    let platforms = if all_platforms {
        crate::warm::Platforms::All
    } else if platforms.is_empty() {
        crate::warm::Platforms::Only(vec![this_platform()])
    } else {
        crate::warm::Platforms::Only(platforms)
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        // Without --registry, warm straight into the data dir through a
        // private, loopback-only wharf on it.
        let (base, local) = match registry {
            Some(url) => (url, None),
            None => {
                let mut config = config.resolve()?;
                config.server.listen = "127.0.0.1:0".parse().expect("literal address");
                config.server.admin_listen = "127.0.0.1:0".parse().expect("literal address");
                let server = crate::start(config).await.map_err(|e| e.to_string())?;
                (format!("http://{}", server.local_addr()), Some(server))
            }
        };
        let failed = crate::warm::Warmer::new(&base, platforms)
            .warm_all(&images)
            .await;
        if let Some(server) = local {
            server.shutdown().await;
        }
        match failed.len() {
            0 => Ok(()),
            n => Err(format!("{n} of {} image(s) failed", images.len())),
        }
    })
}

/// `linux/amd64` and the like, for this machine.
fn this_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}
