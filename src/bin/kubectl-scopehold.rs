//! `kubectl-scopehold`: the kubectl plugin (`kubectl scopehold …` when this
//! binary is on PATH). Parses flags and hands over to `scopehold::cli`.

use std::process::ExitCode;

use clap::Parser;
use scopehold::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            cli::output::note(&format!("Error: starting the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::output::note(&format!("Error: {e}"));
            ExitCode::FAILURE
        }
    }
}
