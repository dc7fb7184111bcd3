//! `taskmanager`: a worker agent that runs the tasks the dispatcher leader assigns to it.
//!
//! Exit status: 0 after SIGTERM or Ctrl-C (tasks stopped, unregistered), 2 for bad
//! flags, 1 if the agent cannot run.

use clap::Parser;
use dispatcher_client::taskmanager::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let log_format = args.log_format;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("taskmanager: {e}");
            std::process::exit(2);
        }
    };
    let filter = EnvFilter::try_from_env("TASKMANAGER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log_format {
        LogFormat::Text => logs.with_ansi(colour()).init(),
        LogFormat::Json => logs.json().init(),
    }
    tracing::info!(
        id = %config.id,
        slots = config.slots,
        work_dir = %config.work_dir.display(),
        tasks_run_as = %config.sandbox.describe(),
        tls = config.tls.is_some(),
        client_certificate = config.tls.as_ref().is_some_and(|t| t.has_identity()),
        token = config.token.is_some(),
        "taskmanager starting"
    );
    if config.sandbox.user.uid == 0 {
        tracing::warn!(id = %config.id, "command tasks run as root (--allow-root-tasks)");
    }
    if let Err(e) = dispatcher_client::taskmanager::run(config, shutdown_signal()).await {
        eprintln!("taskmanager: {e}");
        std::process::exit(1);
    }
}

/// Colour codes only on a terminal (in a file or a pipe they are noise), and not when
/// `NO_COLOR` is set. The dispatcher's `logging::init` decides the same way; the client
/// crate does not depend on the server crate, so these lines are repeated there.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
