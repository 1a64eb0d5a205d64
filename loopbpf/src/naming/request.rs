//! The HTTP request a block ran for, as read from V8's heap (a Node `IncomingMessage` among
//! the JS frames' receivers and arguments).

use serde::Serialize;

/// The request with the most sample weight in a block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_span_id: [u8; 8],
    pub flags: u8,
}
