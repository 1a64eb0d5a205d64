//! loopbpf: finds when and why a Node.js (libuv) event loop is blocked, from outside the process.
//!
//! `main` only parses the command line (`loopbpf ...` or `loopbpf record ...`), runs the session
//! and turns the result into an exit code.

// First: its macros are in scope in the modules declared after it.
#[macro_use]
mod diag;

mod abi;
mod aggregate;
mod cli;
mod decode;
mod discover;
mod naming;
mod output;
mod probe;
mod session;
mod target;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match session::run(&args) {
        Ok(code) => code,
        Err(error) => {
            // The error may name what a target wrote (its comm, a path).
            eprintln!("loopbpf: error: {}", diag::printable(&format!("{error:#}")));
            ExitCode::FAILURE
        }
    }
}
