//! `duo-bench`: red-team attacks, judges, metrics, reports and the performance harness.
//! The red-team bench (`eval`), the parity entry points that outside scripts call, the performance
//! harness, the quality gates of a toy-world model, and retraining its concept judge.

mod chart;
mod cli;
mod compare;
mod eval;
mod fid;
mod judge;
mod judge_check;
mod judge_train;
mod lpips;
mod merge;
mod perf;
mod quality;
mod rows;
mod study;
mod sweep;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    duo_core::device::keep_freed_memory();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
