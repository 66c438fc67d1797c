//! The event-piper binary: parse the configuration, set up logging, run until a signal.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use event_piper::Config;
use event_piper::config::{Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// jemalloc: it keeps no header inside a block, so the pages of a buffer nobody writes (an idle
/// stream's hyper read buffer) cost no memory, where glibc's chunk header made each cost a page;
/// and it takes less CPU than glibc on replays (BENCHMARKS.md, "The allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Config::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line a person can act on, not a Debug dump.
            eprintln!("event-piper: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    if let Some(Command::Token {
        sub,
        ttl,
        publish,
        types,
        subscriptions,
    }) = &config.command
    {
        let secret = config.jwt_secret.as_deref().ok_or_else(|| {
            anyhow::anyhow!("event-piper token needs --jwt-secret (or EVENT_PIPER_JWT_SECRET)")
        })?;
        let grants = event_piper::auth::Grants {
            publish: *publish,
            subscriptions: *subscriptions,
            types: types.as_deref(),
        };
        let token = event_piper::auth::mint_granting(secret, sub, *ttl, grants)?;
        println!("{token}");
        return Ok(());
    }
    if config.dump_config {
        println!("{}", serde_json::to_string_pretty(&config.to_json())?);
        return Ok(());
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        // Colours only for a person at a terminal, not in files or log collectors.
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
    event_piper::run(config).await?;
    Ok(())
}
