//! `dispatchctl`: the command-line client. See `dispatcher::cli` for commands and exit
//! codes.

use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    dispatcher::cli::run(dispatcher::cli::Cli::parse()).await
}
