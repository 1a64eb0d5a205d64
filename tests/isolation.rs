//! One process whose naming is slow holds up no other: with every naming job of one fixture
//! made 2 s longer (loopbpf's test hook, `LOOPBPF_TEST_NAMING_DELAY`, built in with the
//! `test-hooks` feature: `cargo xtask test` builds it as `$LOOPBPF_HOOKS_BIN`), another
//! fixture's blocks are still reported, named, within 500 ms of their end, `/metrics` answers
//! within a second, and the slow fixture's block is reported without stacks, said so.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use loopbpf_tests::{Fixture, Loopbpf, poll_until, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn free_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// `/metrics` and how long it took to answer.
fn scrape(address: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).expect("metrics server not listening");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (response, started.elapsed())
}

#[test]
fn a_process_slow_to_name_holds_up_no_other() {
    require_root();
    let mut slow = Fixture::start();
    let mut benign = Fixture::start();
    // SAFETY: the only test of this binary: no other thread reads or writes the environment.
    unsafe {
        std::env::set_var("LOOPBPF_TEST_NAMING_DELAY", format!("{}:2000", slow.pid()));
        // `cargo xtask test` builds the hooked binary aside from the one users run.
        if let Some(hooks) = std::env::var_os("LOOPBPF_HOOKS_BIN") {
            std::env::set_var("LOOPBPF_BIN", hooks);
        }
    }
    let address = free_address();
    let mut loopbpf = Loopbpf::watch_all(&["--json", "--metrics", &address]);
    let hooked = loopbpf.err.seen.iter().any(|l| l.contains("test hook"))
        || loopbpf
            .err
            .wait_for(Duration::from_secs(5), |l| l.contains("test hook"))
            .is_some();
    assert!(
        hooked,
        "this loopbpf has no test hooks: build it with --features test-hooks; stderr: {:?}",
        loopbpf.err.seen
    );

    // The slow process blocks: its naming lane is busy for many seconds.
    slow.send("block timer spin 300");
    slow.done("block", TIMEOUT);
    // Whatever lane the benign process started on, it is off the slow one by now, and named.
    benign.send("block timer spin 200");
    benign.done("block", TIMEOUT);
    loopbpf.wait_for_block(benign.pid(), TIMEOUT);

    for _ in 0..3 {
        benign.send("block timer spin 200");
        let done = benign.done("block", TIMEOUT);
        let ended_ms =
            done["start_unix_ms"].as_f64().unwrap() + done["measured_ms"].as_f64().unwrap();
        let block = loopbpf.wait_for_block(benign.pid(), TIMEOUT);
        let late_ms = unix_ms() - ended_ms;
        assert!(
            late_ms < 500.0,
            "the benign block came {late_ms:.0} ms after it ended"
        );
        let stacks = block["stacks"]
            .as_array()
            .expect("the benign block's stacks");
        assert!(!stacks.is_empty(), "the benign block is named: {block}");
        let (metrics, took) = scrape(&address);
        assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
        assert!(metrics.starts_with("HTTP/1."), "{metrics}");
    }

    // The slow process's block waited its 2 s, then went without stacks, said so and counted.
    let slow_pid = slow.pid();
    let is_slow_block = |l: &str| {
        serde_json::from_str::<Value>(l)
            .is_ok_and(|v| v["event"] == "block" && v["pid"] == slow_pid)
    };
    let line = match loopbpf.out.seen.iter().find(|l| is_slow_block(l)) {
        Some(line) => line.clone(),
        None => loopbpf
            .out
            .wait_for(TIMEOUT, is_slow_block)
            .expect("the slow process's block is reported"),
    };
    let slow_block: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(slow_block["naming_timed_out"], true, "{slow_block}");
    assert!(slow_block.get("stacks").is_none(), "{slow_block}");
    // The metrics are rendered once a second.
    let timeouts = || {
        scrape(&address)
            .0
            .lines()
            .find_map(|l| l.strip_prefix("loopbpf_naming_timeouts_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        poll_until(Duration::from_secs(3), || timeouts() >= 1.0),
        "no naming timeout counted in /metrics"
    );
    loopbpf.stop(TIMEOUT);
}
