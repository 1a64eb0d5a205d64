//! The metrics server (`--metrics`) among clients that misbehave: a slow client (slowloris) is
//! cut off after the header timeout while scrapes keep answering at once, and running out of
//! file descriptors makes loopbpf pause its accepts, not spin a core, and recover once the
//! connections close.

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use loopbpf_tests::{Fixture, Loopbpf, poll_until, require_root};

/// The server's header timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

fn free_address() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// GET /metrics; the body, if the server answered.
fn scrape(address: &str, timeout: Duration) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    // `HTTP/1.0 200 OK`: hyper answers in the request's version.
    let status = head.lines().next()?;
    (status.starts_with("HTTP/1.") && status.split(' ').nth(1) == Some("200"))
        .then(|| body.to_owned())
}

/// loopbpf watching a blocker fixture and serving metrics at the returned address.
fn serving() -> (Fixture, Loopbpf, String) {
    let node = Fixture::start();
    let address = free_address();
    let loopbpf = Loopbpf::attach(&["--pid", &node.pid().to_string(), "--metrics", &address]);
    assert!(
        poll_until(Duration::from_secs(10), || scrape(
            &address,
            Duration::from_secs(2)
        )
        .is_some()),
        "the metrics server never answered"
    );
    (node, loopbpf, address)
}

/// How long until the server closes `stream` (reads EOF or a reset), reading whatever it
/// sends; `None` if it stays open for `limit`.
fn closed_after(stream: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    while since.elapsed() < limit {
        match stream.read(&mut buffer) {
            Ok(0) => return Some(since.elapsed()),
            // A 408 the server may send before it closes.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(since.elapsed()),
        }
    }
    None
}

#[test]
fn a_slow_client_is_cut_off_and_scrapes_answer_meanwhile() {
    require_root();
    let (_node, loopbpf, address) = serving();

    let started = Instant::now();
    // Half a request line, and then nothing; and a connection that never sends a byte.
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"GET /metri").unwrap();
    let mut silent = TcpStream::connect(&address).unwrap();

    // Meanwhile, a scrape answers at once.
    for _ in 0..3 {
        let asked = Instant::now();
        let body = scrape(&address, Duration::from_secs(5)).expect("a scrape beside a slow client");
        let took = asked.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "a scrape took {took:?} beside a slow client"
        );
        assert!(body.contains("loopbpf_processes_watched 1"), "{body}");
        std::thread::sleep(Duration::from_millis(500));
    }

    let limit = HEADER_TIMEOUT + Duration::from_secs(4);
    for (what, stream) in [("half a request line", &mut slow), ("nothing", &mut silent)] {
        let closed = closed_after(stream, started, limit).unwrap_or_else(|| {
            panic!("a client that sent {what} was still connected after {limit:?}")
        });
        assert!(
            closed + Duration::from_millis(500) >= HEADER_TIMEOUT,
            "a client that sent {what} was cut off after {closed:?}, before the header timeout"
        );
        eprintln!("a client that sent {what} was cut off after {closed:?}");
    }
    drop(loopbpf);
}

/// CPU seconds process `pid` used so far (user and system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the comm.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

fn open_files(pid: u32) -> u64 {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64
}

#[test]
fn out_of_file_descriptors_the_server_pauses_and_recovers() {
    require_root();
    let (_node, mut loopbpf, address) = serving();
    let pid = loopbpf.pid();

    // A few descriptors to spare, then 100 clients: accept fails with EMFILE.
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: with a null new limit, prlimit only writes the current one into `rlimit`.
    let rc = unsafe {
        libc::prlimit(
            pid.cast_signed(),
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &raw mut rlimit,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    rlimit.rlim_cur = open_files(pid) + 6;
    // SAFETY: prlimit reads `rlimit`, a valid struct, and writes nothing (null old limit).
    let rc = unsafe {
        libc::prlimit(
            pid.cast_signed(),
            libc::RLIMIT_NOFILE,
            &raw const rlimit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let clients: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&address).expect("connect: the kernel queues it"))
        .collect();

    // Two seconds out of descriptors: loopbpf waits between accepts instead of spinning.
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    eprintln!(
        "loopbpf used {used:.2} s of CPU in 2 s out of descriptors, with {} open",
        open_files(pid)
    );
    assert!(
        used < 0.4,
        "loopbpf used {used:.2} s of CPU in 2 s while out of file descriptors"
    );
    assert!(
        loopbpf
            .err
            .wait_for(Duration::from_secs(1), |l| l
                .contains("the metrics server cannot accept connections"))
            .is_some(),
        "loopbpf did not say it cannot accept: {:?}",
        loopbpf.err.seen
    );

    // The clients leave: scrapes work again within the longest pause and a little.
    drop(clients);
    let left = Instant::now();
    assert!(
        poll_until(Duration::from_secs(10), || scrape(
            &address,
            Duration::from_secs(2)
        )
        .is_some()),
        "no scrape answered after the clients left"
    );
    let took = left.elapsed();
    eprintln!("scrapes answered again {took:?} after the clients left");
    assert!(
        took < Duration::from_secs(5),
        "recovered only after {took:?}"
    );
}
