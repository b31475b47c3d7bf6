//! `duo-bench`: red-team attacks, judges, metrics, reports and the performance harness.
//! This first part holds the parity entry points that outside scripts call.

mod cli;
mod perf;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
