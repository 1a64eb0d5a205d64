//! loopbpf: finds when and why a Node.js (libuv) event loop is blocked, from outside the process.
//!
//! `main` only parses the command line, runs the session and turns the result into an exit code.

mod aggregate;
mod cli;
mod decode;
mod discover;
mod flame;
mod launch;
mod metrics;
mod probe;
mod report;
mod session;
mod stacks;
mod symbolize;
mod unwind;
mod v8;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match session::run(&args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("loopbpf: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
