//! Time as the outputs show it: the kernel's monotonic nanoseconds turned into wall-clock time,
//! durations for people (`12.3 ms`) and for JSON (milliseconds to the hundredth).

/// Converts the kernel's `CLOCK_MONOTONIC` nanoseconds to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic_ns: i128::from(real) - i128::from(mono),
        }
    }

    /// A clock whose monotonic zero is `unix_ns`: output that does not depend on when a test runs.
    #[cfg(test)]
    pub fn fixed(unix_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns: unix_ns,
        }
    }

    /// Now, in the kernel side's time base.
    pub fn monotonic_ns() -> u64 {
        clock_ns(libc::CLOCK_MONOTONIC)
    }

    pub fn unix_ns(self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns
    }

    pub fn unix_ms(self, monotonic_ns: u64) -> f64 {
        (self.unix_ns(monotonic_ns) / 1000) as f64 / 1000.0
    }

    /// `HH:MM:SS.mmm` in local time.
    pub fn time_of_day(self, monotonic_ns: u64) -> String {
        let unix_ns = self.unix_ns(monotonic_ns);
        let secs = (unix_ns / 1_000_000_000) as libc::time_t;
        let millis = (unix_ns % 1_000_000_000) / 1_000_000;
        // SAFETY: tm is plain old data; localtime_r fills it from a valid time_t.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        unsafe { libc::localtime_r(&raw const secs, &raw mut tm) };
        format!(
            "{:02}:{:02}:{:02}.{millis:03}",
            tm.tm_hour, tm.tm_min, tm.tm_sec
        )
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer; the clocks used always exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds as milliseconds, to the hundredth, as the JSON records carry them.
pub fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e4).round() / 100.0
}

/// `850 us`, `12.3 ms`, `1.52 s`.
pub fn human(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 1.0 {
        format!("{:.0} us", ns as f64 / 1e3)
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}
