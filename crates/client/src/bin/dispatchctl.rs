//! `dispatchctl`: the command-line client. See `dispatcher_client::cli` for commands and exit
//! codes.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    dispatcher_client::cli::run(dispatcher_client::cli::Cli::parse()).await
}
