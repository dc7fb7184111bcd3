//! `dispatchctl`: the command-line client. See `dispatcher_client::cli` for commands and exit
//! codes.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`dispatchctl job list | head`),
    // as Unix tools do, instead of panicking in `println!` on EPIPE.
    // SAFETY: restoring the default disposition of a signal installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    dispatcher_client::cli::run(dispatcher_client::cli::Cli::parse()).await
}
