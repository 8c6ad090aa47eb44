//! The `wharf` command line. Parsing and dispatch only; the work is in the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wharf::config::{Config, Overrides};

#[derive(Parser)]
#[command(version, about = "A pull-through caching proxy for container registries")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
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
        Command::Serve { config, listen, data_dir, tag_ttl, max_size, upstreams } => {
            let overrides = Overrides { listen, data_dir, tag_ttl, max_size, upstreams };
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

fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Config, String> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
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
    // Scripts and tests read the bound port from this line (e.g. with --listen 127.0.0.1:0).
    println!("wharf listening on {}", server.local_addr());
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
