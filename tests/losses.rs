//! What the kernel side loses, and what it must not: a process flooding stack records is held
//! to its stack rate and crowds out no block or loop event of another process; a loop thread's
//! exit lost to a full ring buffer still ends its busy interval (no phantom ongoing block).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use loopbpf_tests::{
    Fixture, Loopbpf, Truth, assert_block_close, events, node_bin, require_root, wait_until,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

fn free_address() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("no free port")
        .port();
    format!("127.0.0.1:{port}")
}

fn metrics(address: &str) -> String {
    let mut stream = TcpStream::connect(address).expect("the metrics endpoint answers");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the series whose line starts with `series` (name and labels), if served.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn of_pid(values: &[Value], kind: &str, pid: u32) -> Vec<Value> {
    events(values, kind)
        .into_iter()
        .filter(|v| v["pid"] == pid)
        .cloned()
        .collect()
}

#[test]
fn a_flood_of_stacks_crowds_out_no_block_of_another_process() {
    require_root();
    let mut flooder = Fixture::start_script(&node_bin(), "flood.js", &[]);
    let mut benign = Fixture::start();
    let (flooder_pid, benign_pid) = (flooder.pid(), benign.pid());
    let address = free_address();
    let mut loopbpf =
        Loopbpf::watch_all(&["--json", "--sample-rate", "1000", "--metrics", &address]);
    // Six loops busy for good, each sleeping 1 ms at a time: an off-CPU stack every millisecond
    // each, about 6000 a second against a limit of 2000, for almost no CPU time.
    flooder.send("flood-stacks 6");
    flooder.done("flood-stacks", TIMEOUT);
    thread::sleep(Duration::from_secs(1));

    let mut truths = Vec::new();
    for command in [
        "block timer spin 150",
        "block io spin 300",
        "block immediate crypto 200",
        "block timer fs-sync 250",
        "block microtask spin 120",
    ] {
        benign.send(command);
        truths.push(Truth::from(&benign.done("block", TIMEOUT)));
    }
    // A worker: its loop found, its block, its exit.
    benign.send("worker-block 200");
    let worker_ms = benign.done("worker-block", TIMEOUT)["measured_ms"]
        .as_f64()
        .unwrap();
    thread::sleep(Duration::from_secs(2));

    // Whose stacks the limit dropped, said on stderr and in the metrics: the flooder's only.
    let said = loopbpf.err.wait_for(TIMEOUT, |l| {
        l.contains(&format!(
            "stacks of pid {flooder_pid} dropped so far by the per-process limit"
        ))
    });
    assert!(
        said.is_some(),
        "no word of the limit: {:?}",
        loopbpf.err.seen
    );
    let served = metrics(&address);
    let limited = |pid: u32| {
        series(
            &served,
            &format!("loopbpf_process_stacks_rate_limited_total{{pid=\"{pid}\"}}"),
        )
    };
    assert!(limited(flooder_pid).is_some_and(|n| n > 100.0), "{served}");
    assert_eq!(limited(benign_pid), None, "{served}");
    assert!(
        series(&served, "loopbpf_stacks_rate_limited_total").is_some_and(|n| n > 100.0),
        "{served}"
    );
    assert_eq!(
        series(&served, "loopbpf_lost_events_total{kind=\"control\"}"),
        Some(0.0),
        "control events were lost: {served}"
    );

    let output = loopbpf.stop(Duration::from_mins(1));
    // Every block of the benign process, each as long as it measured.
    let blocks = of_pid(&output, "block", benign_pid);
    let main: Vec<&Value> = blocks.iter().filter(|b| b["thread"] == "main").collect();
    assert_eq!(main.len(), truths.len(), "{blocks:?}");
    for (block, truth) in main.iter().zip(&truths) {
        assert_block_close(block, *truth, "a block of the benign process");
    }
    let worker: Vec<&Value> = blocks.iter().filter(|b| b["thread"] == "worker").collect();
    assert_eq!(worker.len(), 1, "{blocks:?}");
    // The worker's block is its whole busy stretch: its spin, and the timer callback around it.
    let reported = worker[0]["duration_ms"].as_f64().unwrap();
    assert!(
        reported >= worker_ms - 2.0 && reported <= worker_ms + 20.0,
        "worker block {reported} ms, spin {worker_ms} ms"
    );
    // Its loop found and its exit taken: the summary has both loops, the worker exited.
    let summary = &events(&output, "summary")[0];
    let loops: Vec<&Value> = summary["loops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["pid"] == benign_pid)
        .collect();
    assert_eq!(loops.len(), 2, "{summary}");
    assert!(
        loops
            .iter()
            .any(|l| l["thread"] == "worker" && l["exited"] == true),
        "{summary}"
    );
    let main_summary = loops.iter().find(|l| l["thread"] == "main").unwrap();
    assert_eq!(main_summary["blocks"], truths.len(), "{summary}");
    assert!(flooder.is_running() && benign.is_running());
}

#[test]
fn a_loop_exit_lost_to_a_full_ring_buffer_leaves_no_phantom_ongoing_block() {
    require_root();
    let mut node = Fixture::start_script(&node_bin(), "flood.js", &[]);
    let pid = node.pid();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid.to_string(), "--json", "--no-stacks"]);
    node.send("busy-worker");
    node.done("busy-worker", TIMEOUT);
    // loopbpf sees the worker stuck.
    let ongoing = loopbpf
        .out
        .wait_for(TIMEOUT, |l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["event"] == "ongoing" && v["thread"] == "worker")
        })
        .expect("the stuck worker was not reported ongoing");
    let tid = serde_json::from_str::<Value>(&ongoing).unwrap()["tid"]
        .as_u64()
        .unwrap();

    // loopbpf stopped: nobody reads the control events while 60,000 GC pauses fill their ring
    // buffer (about 22,000 fit), then the worker exits and its exit event finds no room.
    loopbpf.signal(libc::SIGSTOP);
    node.send("flood-gc 60000");
    node.done("flood-gc", Duration::from_mins(2));
    node.send("end-worker");
    let busy_ms = node.done("end-worker", TIMEOUT)["busy_ms"]
        .as_f64()
        .unwrap();
    wait_until("the worker thread to be gone", TIMEOUT, || {
        !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
    });
    // Gone for a while: an ongoing block reported from here on would be a phantom.
    thread::sleep(Duration::from_millis(1500));
    loopbpf.signal(libc::SIGCONT);
    let lost = loopbpf
        .err
        .wait_for(TIMEOUT, |l| l.contains("events lost so far"))
        .expect("no word of lost events");
    let control_lost: u64 = lost
        .split(": ")
        .nth(2)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of control events lost in {lost:?}"));
    assert!(control_lost > 1000, "{lost}");
    thread::sleep(Duration::from_secs(3));
    let output = loopbpf.stop(TIMEOUT);

    for ongoing in events(&output, "ongoing")
        .into_iter()
        .filter(|o| o["tid"] == tid)
    {
        let ms = ongoing["duration_ms"].as_f64().unwrap();
        assert!(
            ms <= busy_ms + 100.0,
            "the worker, gone after {busy_ms:.0} ms, was said blocked {ms:.0} ms: {ongoing}"
        );
    }
    // Its end taken from the threads map: exited, no block going on, and its busy interval
    // counted whole (it ended at the poll wait Node's teardown ran the loop into, a block event
    // lost with the rest).
    let summary = &events(&output, "summary")[0];
    let worker = summary["loops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["tid"] == tid)
        .unwrap_or_else(|| panic!("no worker in {summary}"));
    assert_eq!(worker["exited"], true, "{worker}");
    assert!(worker["ongoing_ms"].is_null(), "{worker}");
    assert_eq!(worker["blocks"], 1, "{worker}");
    let longest = worker["max_busy_ms"].as_f64().unwrap();
    // The fixture times the spin from the main thread: from the worker's first message to its
    // exit event, each arriving a few ms late (CI saw loopbpf 7 ms under it). An interval cut
    // short (at the last state read before loopbpf stopped) would be seconds under.
    assert!(
        longest >= busy_ms - 50.0 && longest <= busy_ms + 500.0,
        "the worker's longest busy interval {longest} ms, it spun {busy_ms} ms"
    );
    assert!(node.is_running());
}
