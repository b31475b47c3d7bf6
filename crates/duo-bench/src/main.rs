//! `duo-bench`: red-team attacks, judges, metrics, reports and the performance harness.
//! So far: the parity entry points that outside scripts call, the performance harness and the
//! quality gates of a toy-world model, and retraining its concept judge.

mod cli;
mod judge_check;
mod judge_train;
mod perf;
mod quality;

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
