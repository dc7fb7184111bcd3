//! `dispatcher`: one replica (Raft node + gRPC server + sled data directory).
//!
//! Parses flags (and `DISPATCHER_*`, and `--config`), sets up logging, and runs the
//! replica until SIGTERM or Ctrl-C. Exit status: 0 after a clean shutdown, 2 for a bad
//! configuration, 1 when the replica cannot start or fails (including when its Raft
//! core stops on a storage error: crash-only, the supervisor restarts it), or when a
//! stop takes longer than [`STOP_LIMIT`] after the signal.

use std::time::Duration;

use clap::Parser;
use dispatcher_server::server::config::Args;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dispatcher: {e}");
            std::process::exit(2);
        }
    };
    let suppressed = dispatcher_server::logging::init(config.log_format);
    tokio::spawn(suppressed.report());
    if let Err(e) = dispatcher_server::server::run(config, shutdown_signal()).await {
        tracing::error!(error = %e, "replica stopped");
        eprintln!("dispatcher: {e}");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    exit_after(STOP_LIMIT);
}

/// Longest a stop may take after SIGTERM: the connection drain, Raft's stop and the
/// runtime's end together. A thread of its own, because what it guards against is a
/// runtime that no longer makes progress (a blocking write to a full disk).
const STOP_LIMIT: Duration = Duration::from_secs(15);

fn exit_after(limit: Duration) {
    let spawned = std::thread::Builder::new()
        .name("stop-limit".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!("dispatcher: still stopping {limit:?} after the signal; exiting now");
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot bound the stop");
    }
}
