//! A real OTLP receiver for the tests: the official protobuf definitions (Python
//! `opentelemetry-proto`) served over gRPC and over HTTP (`tests/fixtures/otlp_receiver.py`, in
//! the venv `scripts/install-deps.sh` makes); what it decoded, one JSON value per span.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::fixture;

/// The Python of the receiver's venv, where `scripts/install-deps.sh` puts it
/// (`$LOOPBPF_OTLP_PY_CACHE`, by default `/var/cache/loopbpf-otlp-py`).
fn receiver_python() -> PathBuf {
    let python = std::env::var_os("LOOPBPF_OTLP_PY_CACHE")
        .map_or_else(
            || PathBuf::from("/var/cache/loopbpf-otlp-py"),
            PathBuf::from,
        )
        .join("bin/python");
    assert!(
        python.exists(),
        "LOUD FAILURE, NOT A SKIP: no OTLP receiver venv at {}: run scripts/install-deps.sh",
        python.display()
    );
    python
}

/// A running OTLP receiver and what it decoded.
pub struct Receiver {
    child: Child,
    pub grpc_port: u16,
    pub http_port: u16,
    spans: PathBuf,
}

impl Receiver {
    /// Starts the receiver; `delay` answers each export that late; `http_port` (0: any).
    pub fn start(name: &str, delay: Duration, http_port: u16) -> Self {
        Self::start_with(name, delay, http_port, 0)
    }

    /// Starts the receiver; it answers the first `unavailable` HTTP exports 503.
    pub fn start_with(name: &str, delay: Duration, http_port: u16, unavailable: u32) -> Self {
        let spans =
            std::env::temp_dir().join(format!("loopbpf-otlp-{name}-{}.jsonl", std::process::id()));
        let _ = fs::remove_file(&spans);
        let mut child = Command::new(receiver_python())
            .arg(fixture("otlp_receiver.py"))
            .arg("--out")
            .arg(&spans)
            .args(["--delay", &delay.as_secs_f64().to_string()])
            .args(["--http-port", &http_port.to_string()])
            .args(["--unavailable", &unavailable.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start the OTLP receiver");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        let ports: Vec<u16> = ready
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the OTLP receiver did not start: {ready:?}"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        Self {
            child,
            grpc_port: ports[0],
            http_port: ports[1],
            spans,
        }
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<Value> {
        fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.spans);
        let _ = fs::remove_file(self.refused_file());
    }
}

impl Receiver {
    fn refused_file(&self) -> PathBuf {
        let mut name = self.spans.clone().into_os_string();
        name.push(".refused");
        PathBuf::from(name)
    }

    /// When it refused exports (503), in Unix seconds.
    pub fn refused(&self) -> Vec<f64> {
        fs::read_to_string(self.refused_file())
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }
}
