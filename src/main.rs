//! The `wharf` command line. Parsing and dispatch only; the work is in the library.

use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use wharf::config::{Config, Overrides};

#[derive(Parser)]
#[command(
    version,
    about = "A pull-through caching proxy for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` or `json`; filter with RUST_LOG (e.g. `info,wharf::upstream=debug`).
    #[arg(long, global = true, default_value = "text", env = "WHARF_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (defaults: 0.0.0.0:5000, ./wharf-data, mirrors Docker Hub, ghcr.io, quay.io, registry.k8s.io).
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "WHARF_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 0.0.0.0:5000.
        #[arg(long)]
        listen: Option<String>,
        /// Address for /metrics, /healthz and /readyz, e.g. 0.0.0.0:9090.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Where blobs, manifests and the index live.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How long a tag is served without asking upstream, e.g. 5m.
        #[arg(long)]
        tag_ttl: Option<String>,
        /// Byte budget for cached blobs, e.g. 20GiB.
        #[arg(long)]
        max_size: Option<String>,
        /// NAME=URL; repeatable; replaces the configured upstreams; the first is the default.
        #[arg(long = "upstream", value_name = "NAME=URL")]
        upstreams: Vec<String>,
    },
    /// Validate a configuration file and report every problem.
    CheckConfig { file: PathBuf },
    /// Inspect or clean a data dir (refuses while `wharf serve` uses it).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The data dir; default: the config file's, else ./wharf-data.
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
        /// Take the data dir from this configuration file.
        #[arg(long, global = true, env = "WHARF_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match cli.command {
        Command::CheckConfig { file } => match load(Some(&file), &Overrides::default()) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("{message}");
                ExitCode::FAILURE
            }
        },
        Command::Cache {
            action,
            data_dir,
            config,
        } => {
            let dir = match data_dir {
                Some(dir) => dir,
                None => match load(config.as_deref(), &Overrides::default()) {
                    Ok(config) => config.storage.dir,
                    Err(message) => {
                        eprintln!("{message}");
                        return ExitCode::from(2);
                    }
                },
            };
            match cache_command(&dir, action) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("wharf cache: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            config,
            listen,
            admin_listen,
            data_dir,
            tag_ttl,
            max_size,
            upstreams,
        } => {
            let overrides = Overrides {
                listen,
                admin_listen,
                data_dir,
                tag_ttl,
                max_size,
                upstreams,
            };
            match load(config.as_deref(), &overrides) {
                Ok(config) => serve(config),
                Err(message) => {
                    eprintln!("{message}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn cache_command(dir: &std::path::Path, action: CacheAction) -> Result<String, String> {
    let admin = wharf::admin::Admin::open(dir).map_err(|e| e.to_string())?;
    let purged = |p: wharf::admin::Purged| {
        format!(
            "removed {} tag(s), {} manifest(s), {} blob(s), {}\n",
            p.tags,
            p.manifests,
            p.blobs,
            wharf::admin::human_bytes(p.bytes)
        )
    };
    match action {
        CacheAction::Ls => admin.ls().map_err(|e| e.to_string()),
        CacheAction::Stats => admin.stats().map_err(|e| e.to_string()),
        CacheAction::Verify => {
            let report = admin.verify().map_err(|e| e.to_string())?;
            let mut text = format!("{} file(s) verified\n", report.good);
            for path in &report.quarantined {
                text.push_str(&format!("corrupt, moved to {}\n", path.display()));
            }
            Ok(text)
        }
        CacheAction::Purge { target, older_than } => match (target, older_than) {
            (Some(target), None) => admin
                .purge_repo(&target)
                .map(purged)
                .map_err(|e| e.to_string()),
            (None, Some(age)) => {
                let age = wharf::config::parse_duration(&age)
                    .map_err(|e| format!("--older-than {age:?}: {e}"))?;
                admin
                    .purge_older_than(age)
                    .map(purged)
                    .map_err(|e| e.to_string())
            }
            _ => Err("purge takes either REPO[:TAG] or --older-than DURATION".into()),
        },
    }
}

fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
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

#[tokio::main]
async fn serve(config: Config) -> ExitCode {
    let server = match wharf::start(config).await {
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
    if let Some(tls) = server.tls() {
        tokio::spawn(reload_on_sighup(tls));
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

/// Re-reads the TLS certificate and key on every SIGHUP.
async fn reload_on_sighup(tls: std::sync::Arc<wharf::server::tls::TlsFiles>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    while hup.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old certificate")
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
