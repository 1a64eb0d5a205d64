//! The HTTP request a block ran for, as read from V8's heap (a Node `IncomingMessage` among
//! the JS frames' receivers and arguments).

use std::collections::HashMap;

use serde::Serialize;

/// The request with the most sample weight in a block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The URL's path; its query string only with `--request-query`.
    pub path: String,
    /// The route template the framework matched (Express's `req.route.path`, Fastify's URL).
    pub route: Option<String>,
    /// The W3C `traceparent` header the request carried.
    pub trace: Option<TraceParent>,
    /// Other requests on the stack during the same block.
    pub others: u32,
}

/// A W3C trace context (`traceparent: 00-<trace id>-<parent span id>-<flags>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_span_id: [u8; 8],
    pub flags: u8,
}

/// Longest method kept (the longest registered HTTP method is 17 letters; the common ones 7).
const MAX_METHOD: usize = 16;

/// A request from what its `IncomingMessage` holds: `None` when the method is not an HTTP
/// token. The URL's query string (and fragment) is dropped unless `keep_query`: queries carry
/// secrets.
pub fn from_parts(
    method: &str,
    url: &str,
    route: Option<String>,
    trace: Option<TraceParent>,
    keep_query: bool,
) -> Option<Request> {
    let is_token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if method.is_empty() || method.len() > MAX_METHOD || !method.chars().all(is_token) {
        return None;
    }
    let path = if keep_query {
        url
    } else {
        url.split(['?', '#']).next().unwrap_or_default()
    };
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        route,
        trace,
        others: 0,
    })
}

impl Request {
    /// Whether two reads are of one request: the same method and path, and the same route
    /// and trace where both have them.
    fn is_same_as(&self, other: &Self) -> bool {
        fn agree<T: PartialEq>(a: Option<&T>, b: Option<&T>) -> bool {
            a.is_none() || b.is_none() || a == b
        }
        self.method == other.method
            && self.path == other.path
            && agree(self.route.as_ref(), other.route.as_ref())
            && agree(self.trace.as_ref(), other.trace.as_ref())
    }

    /// The same request with what either read of it found.
    fn fuller(mut self, other: Self) -> Self {
        self.route = self.route.or(other.route);
        self.trace = self.trace.or(other.trace);
        self
    }
}

/// A W3C `traceparent` value of version 00: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids
/// not all zeros. `None` for anything else.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let value = value.trim_matches([' ', '\t']);
    let mut parts = value.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" {
        return None;
    }
    let mut trace = TraceParent::default();
    hex_into(trace_id, &mut trace.trace_id)?;
    hex_into(span_id, &mut trace.parent_span_id)?;
    let mut flag = [0u8; 1];
    hex_into(flags, &mut flag)?;
    trace.flags = flag[0];
    let zero = |bytes: &[u8]| bytes.iter().all(|&b| b == 0);
    if zero(&trace.trace_id) || zero(&trace.parent_span_id) {
        return None;
    }
    Some(trace)
}

/// Lowercase hex of exactly `out.len()` bytes into `out`.
fn hex_into(hex: &str, out: &mut [u8]) -> Option<()> {
    if hex.len() != 2 * out.len() {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

impl TraceParent {
    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The caller's span id as 16 lowercase hex digits.
    pub fn parent_span_id_hex(&self) -> String {
        hex(&self.parent_span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Most distinct requests kept for one busy interval; more are counted, not kept.
const MAX_REQUESTS: usize = 64;

/// The requests the samples of one busy interval ran for, with their weight.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestWeights {
    /// Per request: on-CPU samples, off-CPU nanoseconds.
    weights: HashMap<Request, (u64, u64)>,
    /// Samples of requests not kept (past [`MAX_REQUESTS`]): each may be another request.
    untracked: u32,
}

impl RequestWeights {
    /// Counts a sample (on-CPU when `off_cpu_ns` is `None`) that ran for `request`. A sample
    /// whose read of the same request missed a part (its route or its `traceparent`, read
    /// while the GC moved it) counts for the request read whole.
    /// `periods`: the sampling periods an on-CPU sample stands for.
    pub fn add(&mut self, request: Request, off_cpu_ns: Option<u64>, periods: u64) {
        let same = self
            .weights
            .keys()
            .find(|known| known.is_same_as(&request))
            .cloned();
        let (key, mut weight) = match same {
            Some(known) => {
                let weight = self.weights.remove(&known).unwrap_or_default();
                (known.fuller(request), weight)
            }
            None if self.weights.len() >= MAX_REQUESTS => {
                self.untracked = self.untracked.saturating_add(1);
                return;
            }
            None => (request, (0, 0)),
        };
        match off_cpu_ns {
            None => weight.0 += periods,
            Some(ns) => weight.1 += ns,
        }
        self.weights.insert(key, weight);
    }

    /// The request with the most weight, with the count of the others; on-CPU samples weigh
    /// `on_cpu_ns / on_cpu_samples` each.
    pub fn heaviest(&self, on_cpu_ns: u64, on_cpu_samples: u64) -> Option<Request> {
        let weight = |(samples, off_ns): (u64, u64)| {
            u128::from(on_cpu_ns) * u128::from(samples) / u128::from(on_cpu_samples.max(1))
                + u128::from(off_ns)
        };
        let (request, _) = self.weights.iter().max_by(|a, b| {
            weight(*a.1)
                .cmp(&weight(*b.1))
                // Ties go the same way on every run.
                .then_with(|| b.0.path.cmp(&a.0.path))
        })?;
        let others = u32::try_from(self.weights.len() - 1)
            .unwrap_or(u32::MAX)
            .saturating_add(self.untracked);
        Some(Request {
            others,
            ..request.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_read_only_when_well_formed() {
        let t = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("valid");
        assert_eq!(t.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(t.parent_span_id_hex(), "b7ad6b7169203331");
        assert_eq!(t.flags, 1);
        for bad in [
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_query_string_goes_unless_asked_for() {
        let r = from_parts("GET", "/a/b?token=secret#x", None, None, false).unwrap();
        assert_eq!(r.path, "/a/b");
        let r = from_parts("GET", "/a/b?token=secret", None, None, true).unwrap();
        assert_eq!(r.path, "/a/b?token=secret");
        assert_eq!(from_parts("GE T", "/", None, None, false), None);
        assert_eq!(from_parts("", "/", None, None, false), None);
        assert_eq!(
            from_parts("AVERYLONGMETHODNAME", "/", None, None, false),
            None
        );
    }

    #[test]
    fn the_heaviest_request_wins_and_the_others_are_counted() {
        let get = |path: &str| from_parts("GET", path, None, None, false).unwrap();
        let mut weights = RequestWeights::default();
        assert_eq!(weights.heaviest(100, 0), None);
        weights.add(get("/a"), None, 1);
        weights.add(get("/b"), None, 1);
        weights.add(get("/b"), None, 1);
        weights.add(get("/a"), Some(10), 1);
        let top = weights.heaviest(100, 3).unwrap();
        assert_eq!((top.path.as_str(), top.others), ("/b", 1));
        // Off-CPU time counts as it was spent.
        weights.add(get("/a"), Some(1_000), 1);
        assert_eq!(weights.heaviest(100, 3).unwrap().path, "/a");
        for i in 0..200 {
            weights.add(get(&format!("/many/{i}")), None, 1);
        }
        let top = weights.heaviest(100, 203).unwrap();
        assert_eq!(top.others, 1 + 62 + 200 - 62);
    }

    #[test]
    fn a_partial_read_counts_for_the_whole_request() {
        let trace = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let read = |route: Option<&str>, trace| {
            from_parts("GET", "/u/1", route.map(str::to_owned), trace, false).unwrap()
        };
        let mut weights = RequestWeights::default();
        weights.add(read(None, trace), None, 1);
        weights.add(read(Some("/u/:id"), None), None, 1);
        weights.add(read(Some("/u/:id"), trace), None, 1);
        let top = weights.heaviest(30, 3).unwrap();
        assert_eq!(top, read(Some("/u/:id"), trace));
        // Another trace is another request.
        let other = parse_traceparent("00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        weights.add(read(None, other), None, 1);
        assert_eq!(weights.heaviest(40, 4).unwrap().others, 1);
    }
}
