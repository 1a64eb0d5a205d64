//! The HTTP request a sample ran for: a Node `IncomingMessage` (Express's requests are ones
//! too, with Express's prototype) or a Fastify request (around one) among the receivers and
//! first arguments of the sample's JS frames, leaf first, and what it says: method, URL, the
//! route (Express's `req.baseUrl` and `req.route.path`, the URL of Fastify's route config),
//! the `traceparent` header (from `rawHeaders`: `headers` is built lazily).
//!
//! The frame slots are the sample's copy; the objects are read now, while the busy interval
//! runs. An object is taken as a request only when its map was made by Node's own
//! `IncomingMessage` (the constructor's script is `node:_http_incoming`), and only when, after
//! everything was read, the thread's live stack still holds the same pointer in that slot and
//! the object the same map and the same property values: the GC moved nothing read, and the
//! frame still runs that request. Anything else gives no request rather than a wrong one.

use super::{
    JsNamer,
    heap::{FunctionInfo, heap_object, smi},
};
use crate::{
    abi::RED_ZONE,
    decode::StackSample,
    naming::request::{self, Request, TraceParent},
    target::memory::ReadMemory,
};

/// JS frames whose slots are looked at, leaf first (as many as the kernel side captures), and
/// objects looked at in all: each costs two reads (its map, the map's constructor) when it is
/// not a request, so a deep stack with none costs a sample at most 128 more.
const MAX_FRAMES: usize = 32;
const MAX_CANDIDATES: usize = 64;
/// Arguments looked at in each frame, after its receiver.
const MAX_ARGS: u64 = 3;
/// Longest method, URL and route read; a longer URL is cut there, a longer method or route is
/// not one.
const MAX_METHOD: usize = 16;
const MAX_URL: usize = 2048;
const MAX_ROUTE: usize = 512;
/// Entries of `rawHeaders` (names and values) looked through for `traceparent`.
const MAX_HEADER_ENTRIES: u64 = 128;
/// A `traceparent` of version 00 is 55 characters; longer values are not read.
const MAX_TRACEPARENT: usize = 64;
/// Maps followed from an object's map back to its constructor.
const MAX_BACK_POINTERS: usize = 1024;

/// A request read in a busy interval (thread, interval, `--request-query`), by its object
/// and the values read of it (and of Fastify's request around it).
pub(super) type RequestKey = (
    (u32, u64, bool),
    u64,
    [Option<u64>; 6],
    Option<[Option<u64>; 2]>,
);

/// What an object's map was made by, as far as requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MapKind {
    /// Node's `http.IncomingMessage`.
    IncomingMessage,
    /// An Express `Route` (`req.route`).
    ExpressRoute,
    /// Fastify's request (its `raw` is the `IncomingMessage`) and route context.
    FastifyRequest,
    FastifyContext,
    Other,
}

/// The properties of an `IncomingMessage` read, in this order.
const REQUEST_PROPERTIES: [&str; 6] = [
    "method",
    "url",
    "originalUrl",
    "baseUrl",
    "route",
    "rawHeaders",
];

impl JsNamer {
    /// The request the sample's JS frames (found by the last [`JsNamer::js_frames`]) ran for;
    /// the innermost one when there are several. `keep_query`: the URL's query string too.
    pub fn request(&mut self, sample: &StackSample, keep_query: bool) -> Option<Request> {
        self.layout.objects.as_ref()?;
        self.reading_for = (sample.of.tid, sample.of.busy_since_ns, keep_query);
        let mut frames = std::mem::take(&mut self.frame_pointers);
        frames.sort_unstable();
        let [_, sp, _] = sample.regs;
        let base = sp.wrapping_sub(RED_ZONE);
        let stack = &sample.stack;
        let slot = |addr: u64| -> Option<u64> {
            let offset = usize::try_from(addr.checked_sub(base)?).ok()?;
            let bytes = stack.get(offset..offset.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        };
        let (fp_receiver, fp_argc) = (self.layout.fp_receiver, self.layout.fp_function - 8);
        let mut candidates = 0;
        for &fp in frames.iter().take(MAX_FRAMES) {
            // The argument count (the receiver included), a raw integer below the function.
            let Some(argc) = fp.checked_add_signed(fp_argc).and_then(slot) else {
                continue;
            };
            let arg_count = argc.saturating_sub(1).min(MAX_ARGS);
            for i in 0..=arg_count {
                let Some(at) = fp
                    .checked_add_signed(fp_receiver)
                    .and_then(|a| a.checked_add(8 * i))
                else {
                    continue;
                };
                let Some(tagged) = slot(at).filter(|&t| heap_object(t).is_some()) else {
                    continue;
                };
                candidates += 1;
                if candidates > MAX_CANDIDATES {
                    return None;
                }
                if let Some(request) = self.incoming_message(tagged, at, keep_query) {
                    return Some(request);
                }
            }
        }
        None
    }

    /// The request `tagged` (found in the stack slot at `at`) is, if it is one: Node's
    /// `IncomingMessage`, or Fastify's request around one.
    fn incoming_message(&mut self, tagged: u64, at: u64, keep_query: bool) -> Option<Request> {
        let object = heap_object(tagged)?;
        let map_word = self.memory.word(object + self.layout.map)?;
        let map = heap_object(map_word)?;
        let (message, context, outer) = match self.map_kind(map)? {
            MapKind::IncomingMessage => (object, None, None),
            MapKind::FastifyRequest => {
                let outer = self.properties(object, map, FASTIFY_PROPERTIES);
                let [raw, context] = outer;
                (heap_object(raw?)?, context, Some(outer))
            }
            _ => return None,
        };
        let message_map_word = self.memory.word(message + self.layout.map)?;
        let message_map = heap_object(message_map_word)?;
        if self.map_kind(message_map)? != MapKind::IncomingMessage {
            return None;
        }
        let values = self.properties(message, message_map, REQUEST_PROPERTIES);
        // Read already in this busy interval, from the same values: strings do not change, and
        // one the GC moved would have changed the value that points at it.
        let key = (self.reading_for, message, values, outer);
        if let Some(known) = self.requests_read.get(&key).cloned() {
            self.memory.forget_snapshot();
            let still = self.memory.word(at)? == tagged
                && self.memory.word(object + self.layout.map)? == map_word
                && self.memory.word(message + self.layout.map)? == message_map_word;
            return still.then_some(known);
        }
        let route = context.and_then(|c| self.fastify_route(c));
        let [
            method,
            url,
            original_url,
            base_url,
            express_route,
            raw_headers,
        ] = values;
        let method = self.js_string(method?, MAX_METHOD + 1)?;
        // Express rewrites `url` inside mounted routers; `originalUrl` is the whole one.
        let url = original_url
            .and_then(|u| self.js_string(u, MAX_URL))
            .or_else(|| self.js_string(url?, MAX_URL))?;
        let route = route.or_else(|| express_route.and_then(|r| self.express_route(r, base_url)));
        let trace = raw_headers.and_then(|h| self.traceparent(h));
        // Nothing moved while it was read: the frame still holds the object, the objects
        // their maps and their values, as they are now.
        self.memory.forget_snapshot();
        let still = self.memory.word(at)? == tagged
            && self.memory.word(object + self.layout.map)? == map_word
            && outer.is_none_or(|outer| self.properties(object, map, FASTIFY_PROPERTIES) == outer)
            && self.memory.word(message + self.layout.map)? == message_map_word
            && self.properties(message, message_map, REQUEST_PROPERTIES) == values;
        if !still {
            return None;
        }
        let request = request::from_parts(&method, &url, route, trace, keep_query)?;
        if self.may_cache() {
            let bytes = request.path.len() + request.route.as_ref().map_or(0, String::len) + 64;
            self.requests_read.insert(key, request.clone(), bytes);
        }
        Some(request)
    }

    /// Fastify's route template: the URL its route context's config was declared with.
    fn fastify_route(&mut self, context: u64) -> Option<String> {
        let context = heap_object(context)?;
        let map = heap_object(self.memory.word(context + self.layout.map)?)?;
        if self.map_kind(map)? != MapKind::FastifyContext {
            return None;
        }
        let [config] = self.properties(context, map, ["config"]);
        let config = heap_object(config?)?;
        let config_map = heap_object(self.memory.word(config + self.layout.map)?)?;
        let js_object = self.layout.objects.as_ref()?.js_object;
        if self.map_type_of(config_map)? != js_object {
            return None;
        }
        let [url] = self.properties(config, config_map, ["url"]);
        self.js_string(url?, MAX_ROUTE + 1)
            .filter(|route| route.len() <= MAX_ROUTE)
    }

    /// Express's route template: `req.baseUrl` and `req.route.path`.
    fn express_route(&mut self, route: u64, base_url: Option<u64>) -> Option<String> {
        let object = heap_object(route)?;
        let map = heap_object(self.memory.word(object + self.layout.map)?)?;
        if self.map_kind(map)? != MapKind::ExpressRoute {
            return None;
        }
        let [path] = self.properties(object, map, ["path"]);
        // A route's path may be a regular expression or an array: only strings are templates.
        let path = self.js_string(path?, MAX_ROUTE + 1)?;
        let base = base_url
            .and_then(|b| self.js_string(b, MAX_ROUTE + 1))
            .unwrap_or_default();
        let template = base + &path;
        (template.len() <= MAX_ROUTE).then_some(template)
    }

    /// The `traceparent` among a request's `rawHeaders` (names and values, alternating).
    pub(super) fn traceparent(&mut self, raw_headers: u64) -> Option<TraceParent> {
        let array = heap_object(raw_headers)?;
        let ol = self.layout.objects.clone()?;
        if self.instance_type(array)? != ol.js_array {
            return None;
        }
        let length = u64::try_from(smi(self.memory.word(array + ol.elements + 8)?)?).ok()?;
        let elements = heap_object(self.memory.word(array + ol.elements)?)?;
        if self.instance_type(elements)? != self.layout.types.fixed_array {
            return None;
        }
        let capacity = u64::try_from(smi(self
            .memory
            .word(elements + self.layout.array_length)?)?)
        .ok()?;
        let entries = length.min(capacity).min(MAX_HEADER_ENTRIES) & !1;
        let bytes = self.memory.bytes(
            elements + self.layout.fixed_array_data,
            usize::try_from(entries * 8).ok()?,
        )?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        for pair in words.chunks_exact(2) {
            let Some(name) = self.js_string(pair[0], 12) else {
                continue;
            };
            if name.eq_ignore_ascii_case("traceparent") {
                // The first one counts, as a tracer's propagator takes it.
                let value = self.js_string(pair[1], MAX_TRACEPARENT)?;
                return request::parse_traceparent(&value);
            }
        }
        None
    }

    /// A JS string value of at most `max` UTF-16 units (cut there).
    fn js_string(&mut self, tagged: u64, max: usize) -> Option<String> {
        let object = heap_object(tagged)?;
        if !self.is_string(object) {
            return None;
        }
        let units = self.string_units(object, 0, max)?;
        Some(String::from_utf16_lossy(&units))
    }

    /// What made a map, cached by the map and checked against its constructor word.
    fn map_kind(&mut self, map: u64) -> Option<MapKind> {
        let ol = self.layout.objects.clone()?;
        let constructor = self.memory.word(map + self.layout.map_constructor)?;
        if let Some(&(read_from, kind)) = self.request_maps.get(&map)
            && read_from == constructor
        {
            return Some(kind);
        }
        let kind = if self.map_type_of(map)? == ol.js_object {
            match self.constructor_of(map) {
                Some(info) => kind_of(&info),
                None => MapKind::Other,
            }
        } else {
            MapKind::Other
        };
        if self.may_cache() {
            self.request_maps.insert(map, (constructor, kind), 0);
        }
        Some(kind)
    }

    /// The instance type a map describes, read now.
    fn map_type_of(&mut self, map: u64) -> Option<u16> {
        self.memory.u16(map + self.layout.instance_type)
    }

    /// The function whose instances a map describes (following back pointers to it).
    fn constructor_of(&mut self, mut map: u64) -> Option<FunctionInfo> {
        for _ in 0..MAX_BACK_POINTERS {
            let next = heap_object(self.memory.word(map + self.layout.map_constructor)?)?;
            if next == map {
                return None;
            }
            if self.instance_type(next)? == self.layout.types.map {
                map = next;
                continue;
            }
            if !self.is_function(next) {
                return None;
            }
            let shared = heap_object(self.memory.word(next + self.layout.function_shared)?)?;
            return self.function_info(shared);
        }
        None
    }
}

/// The properties of a Fastify request read: its `IncomingMessage`, its route context.
const FASTIFY_PROPERTIES: [&str; 2] = ["raw", "@@fastify.context"];

/// What a constructor's name and script make of its instances.
fn kind_of(info: &FunctionInfo) -> MapKind {
    match (info.name.as_deref(), info.file.as_deref()) {
        (Some("IncomingMessage"), Some("node:_http_incoming")) => MapKind::IncomingMessage,
        (Some("Route"), Some(file)) if file.ends_with("/express/lib/router/route.js") => {
            MapKind::ExpressRoute
        }
        (Some("Request" | "_Request"), Some(file)) if file.ends_with("/fastify/lib/request.js") => {
            MapKind::FastifyRequest
        }
        (Some("Context"), Some(file)) if file.ends_with("/fastify/lib/context.js") => {
            MapKind::FastifyContext
        }
        _ => MapKind::Other,
    }
}
