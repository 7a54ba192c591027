//! A proxy-wasm host on wasmtime that runs the real, release-built filter `.wasm`.
//!
//! Modelled on proxy-wasm-go-sdk's `proxytest`: stateful, queryable, no globals. It implements
//! the proxy-wasm ABI 0.2.1 imports the filter links (and a few more), plus the handful of WASI
//! functions a `wasm32-wasip1` Rust module needs, and follows Envoy's semantics where they
//! matter to a filter:
//!
//! * Header maps are case-insensitive (names are stored lower-case), keep every copy of a
//!   header, and `proxy_get_header_map_value` returns the first copy or `NotFound`;
//!   `proxy_replace_header_map_value` removes every copy and appends one value.
//! * A map exists only while Envoy would hand it to the filter: request headers during
//!   `proxy_on_request_headers` (and after it, only if it paused), response headers during
//!   `proxy_on_response_headers`, both again (read-only) in `proxy_on_log`. Touching a map
//!   outside those windows returns `BadArgument`, which the Rust SDK turns into a panic: a
//!   filter that does so traps here as it would crash in Envoy.
//! * Shared data: `get` of a missing key is `NotFound`; `set` with CAS 0 is unconditional,
//!   with a CAS that is not the current one is `CasMismatch`; every successful `set` takes a
//!   new CAS. One [`SharedData`] is the shared-data space of one Envoy: several [`Vm`]s (the
//!   workers, or a VM replaced on a plugin reload) can use the same one.
//! * Metrics defined twice under one name get the same id; counters only grow.
//! * A local response (`proxy_send_local_response`) ends the request path. As in Envoy, the
//!   reply then goes through the encoder filter chain, this filter included: the filter's
//!   `proxy_on_response_headers` / `proxy_on_response_body` see it (and may change it)
//!   before the client does.
//! * `proxy_http_call` records the call ([`Vm::pending_calls`]) and returns a token; a test
//!   answers it with [`Vm::respond_call`] or fails it with [`Vm::fail_call`] (as Envoy reports
//!   a reset or an unreachable cluster: 0 headers, 0 body, and no response maps at all, so
//!   reading one is `BadArgument`). A cluster the host does not know
//!   ([`Vm::set_known_clusters`]) is `BadArgument`, as in Envoy, as is a call without
//!   `:method`, `:path` or `:authority`.
//! * A root context whose `proxy_on_done` answers false stays alive for its callbacks until
//!   it calls `proxy_done` (then `proxy_on_delete` follows); `proxy_done` at any other time is
//!   `NotFound`, as in Envoy.
//! * The clock is fake: `proxy_get_current_time_nanoseconds` and WASI `clock_time_get` read
//!   [`Vm::now`], which only moves with [`Vm::set_time`], [`Vm::advance`] and a request's
//!   `upstream_latency`.
//!
//! A panic in the filter aborts, which is a wasm trap: the [`Vm`] then remembers it
//! ([`Vm::trapped`], [`Vm::trap`]) and refuses every further call, as Envoy does with a
//! crashed VM.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use wasmtime::{Caller, Config, Engine, Instance, Linker, Memory, Module, Store, TypedFunc};

/// The host's clock when a [`Vm`] starts, in seconds since the Unix epoch (2026-05-28).
pub const DEFAULT_START_UNIX_SECONDS: u64 = 1_780_000_000;

/// The body of the upstream response when a [`Request`] does not give one.
pub const DEFAULT_RESPONSE_BODY: &[u8] = b"{\"ok\":true}";

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The root context's id; HTTP streams get the following ids.
const ROOT_CONTEXT_ID: u32 = 1;

// proxy-wasm status codes (`WasmResult` in proxy-wasm-cpp-host).
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const SERIALIZATION_FAILURE: i32 = 3;
const INVALID_MEMORY_ACCESS: i32 = 6;
const EMPTY: i32 = 7;
const CAS_MISMATCH: i32 = 8;
const INTERNAL_FAILURE: i32 = 10;
const UNIMPLEMENTED: i32 = 12;

// WASI errno values.
const WASI_ESUCCESS: i32 = 0;
const WASI_EBADF: i32 = 8;
const WASI_EFAULT: i32 = 21;
const WASI_EINVAL: i32 = 28;

// Buffer types.
const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: i32 = 1;
const BUFFER_HTTP_CALL_RESPONSE_BODY: i32 = 4;
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;
const BUFFER_MAX: i32 = 8;

// Header map types.
const MAP_HTTP_REQUEST_HEADERS: i32 = 0;
const MAP_HTTP_REQUEST_TRAILERS: i32 = 1;
const MAP_HTTP_RESPONSE_HEADERS: i32 = 2;
const MAP_HTTP_RESPONSE_TRAILERS: i32 = 3;
const MAP_HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
const MAP_HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
const MAP_MAX: i32 = 7;

// Stream types.
const STREAM_HTTP_REQUEST: i32 = 0;
const STREAM_HTTP_RESPONSE: i32 = 1;
const STREAM_MAX: i32 = 3;

// Actions.
const ACTION_CONTINUE: i32 = 0;

/// A proxy-wasm log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

impl LogLevel {
    fn from_abi(level: i32) -> LogLevel {
        match level {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            _ => LogLevel::Critical,
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
        };
        f.write_str(name)
    }
}

/// Header names and values as Envoy holds them: names lower-case, values raw bytes, every
/// copy kept, in order.
pub type Headers = Vec<(String, Vec<u8>)>;

fn lower(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_ascii_lowercase()
}

fn header_values<'a>(headers: &'a Headers, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .filter(move |(n, _)| *n == name)
        .map(|(_, v)| v.as_slice())
}

fn first_header(headers: &Headers, name: &str) -> Option<String> {
    header_values(headers, name)
        .next()
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

fn all_headers(headers: &Headers, name: &str) -> Vec<String> {
    header_values(headers, name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Shared data
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct SharedInner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl SharedInner {
    fn next_cas(&mut self) -> u32 {
        self.last_cas = self.last_cas.wrapping_add(1);
        if self.last_cas == 0 {
            self.last_cas = 1;
        }
        self.last_cas
    }
}

/// VMs started in this process, to give each its own random stream.
static VMS_STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The node id every test VM sees as the `node.id` property.
pub const TEST_NODE_ID: &str = "sidecar~10.1.2.3~api-7d9f.shop~shop.svc.cluster.local";

/// The proxy-wasm shared-data space of one Envoy, shared by the [`Vm`]s started with it.
#[derive(Debug, Clone, Default)]
pub struct SharedData {
    inner: Arc<Mutex<SharedInner>>,
}

impl SharedData {
    /// An empty space.
    pub fn new() -> SharedData {
        SharedData::default()
    }

    fn lock(&self) -> MutexGuard<'_, SharedInner> {
        // A panicking test thread must not hide the data from the others.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The value under `key` and its CAS, as `proxy_get_shared_data` returns them.
    pub fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.lock().entries.get(key).cloned()
    }

    /// `proxy_set_shared_data`: CAS 0 writes unconditionally, another CAS only if it is the
    /// key's current one. Returns the new CAS, or `None` on a CAS mismatch.
    pub fn set(&self, key: &str, value: &[u8], cas: u32) -> Option<u32> {
        let mut inner = self.lock();
        if let Some((_, current)) = inner.entries.get(key) {
            if cas != 0 && cas != *current {
                return None;
            }
        }
        let next = inner.next_cas();
        inner
            .entries
            .insert(key.to_string(), (value.to_vec(), next));
        Some(next)
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.lock().entries.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and what became of them
// ---------------------------------------------------------------------------------------------

/// An HTTP exchange to run through the filter: the request a client sends, and the response
/// the upstream gives if the request reaches it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authority: String,
    /// Client headers after the pseudo-headers; names are lower-cased when sent.
    pub headers: Headers,
    /// Request body chunks, delivered one `proxy_on_request_body` each.
    pub body: Vec<Vec<u8>>,
    pub response_status: u16,
    pub response_headers: Headers,
    /// Response body chunks, delivered one `proxy_on_response_body` each.
    pub response_body: Vec<Vec<u8>>,
    /// How far the fake clock moves while the upstream answers.
    pub upstream_latency: Duration,
}

impl Request {
    /// A request with no headers besides the pseudo-headers; the upstream answers 200 with
    /// [`DEFAULT_RESPONSE_BODY`].
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            authority: "api.example".to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            response_status: 200,
            response_headers: vec![("content-type".to_string(), b"application/json".to_vec())],
            response_body: vec![DEFAULT_RESPONSE_BODY.to_vec()],
            upstream_latency: Duration::ZERO,
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }

    /// Add a client header (another copy if the name is already there).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// `authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Request {
        self.header("authorization", format!("Bearer {token}"))
    }

    pub fn authority(mut self, authority: &str) -> Request {
        self.authority = authority.to_string();
        self
    }

    /// Add a request body chunk.
    pub fn body(mut self, chunk: impl Into<Vec<u8>>) -> Request {
        self.body.push(chunk.into());
        self
    }

    /// The upstream's status; its headers and body are left as they are.
    pub fn respond(mut self, status: u16) -> Request {
        self.response_status = status;
        self
    }

    /// Add an upstream response header.
    pub fn response_header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Request {
        self.response_headers
            .push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Replace the upstream response body with these chunks (none: an empty body).
    pub fn response_body<C: Into<Vec<u8>>>(
        mut self,
        chunks: impl IntoIterator<Item = C>,
    ) -> Request {
        self.response_body = chunks.into_iter().map(Into::into).collect();
        self
    }

    pub fn upstream_latency(mut self, latency: Duration) -> Request {
        self.upstream_latency = latency;
        self
    }

    /// The request header map Envoy would build: pseudo-headers first.
    fn header_map(&self) -> Headers {
        let mut map = vec![
            (":authority".to_string(), self.authority.as_bytes().to_vec()),
            (":path".to_string(), self.path.as_bytes().to_vec()),
            (":method".to_string(), self.method.as_bytes().to_vec()),
            (":scheme".to_string(), b"http".to_vec()),
        ];
        map.extend(
            self.headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
        );
        map
    }
}

/// What the filter passed to `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub details: String,
    pub grpc_status: i32,
}

impl LocalResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        first_header(&self.headers, name)
    }
}

/// A call the filter made with `proxy_http_call`, waiting for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub token: u32,
    /// The cluster named.
    pub upstream: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout: Duration,
}

impl HttpCall {
    /// The first copy of a request header of the call.
    pub fn header(&self, name: &str) -> Option<String> {
        first_header(&self.headers, name)
    }
}

/// The answer the filter is reading, during `proxy_on_http_call_response`; `None` maps for
/// a failed call.
#[derive(Debug, Default)]
struct CallResponse {
    headers: Option<Headers>,
    body: Option<Vec<u8>>,
}

/// The request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// The response as the client received it (after the filter's response callbacks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Without `:status`.
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// What became of one [`Request`].
#[derive(Debug, Clone)]
pub struct Exchange {
    pub context_id: u32,
    /// Set when the filter answered the request itself.
    pub local_response: Option<LocalResponse>,
    /// Set when the request reached the upstream.
    pub upstream: Option<UpstreamRequest>,
    /// What the client got; `None` if the stream stalled or was reset.
    pub response: Option<Response>,
    /// The filter paused the stream and neither resumed it nor answered: in Envoy the
    /// request would hang until a timeout.
    pub stalled: bool,
    /// The filter reset the stream (`proxy_close_stream`).
    pub reset: bool,
}

impl Exchange {
    /// The status the client got: the local response's, or the upstream's; 0 if none.
    pub fn status(&self) -> u16 {
        self.response.as_ref().map_or(0, |r| r.status)
    }

    pub fn reached_upstream(&self) -> bool {
        self.upstream.is_some()
    }

    /// The first copy of a request header as the upstream saw it.
    pub fn upstream_header(&self, name: &str) -> Option<String> {
        self.upstream
            .as_ref()
            .and_then(|u| first_header(&u.headers, name))
    }

    /// Every copy of a request header as the upstream saw it.
    pub fn upstream_headers(&self, name: &str) -> Vec<String> {
        self.upstream
            .as_ref()
            .map(|u| all_headers(&u.headers, name))
            .unwrap_or_default()
    }

    /// The first copy of a response header as the client saw it.
    pub fn header(&self, name: &str) -> Option<String> {
        self.response
            .as_ref()
            .and_then(|r| first_header(&r.headers, name))
    }

    /// Every copy of a response header as the client saw it.
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.response
            .as_ref()
            .map(|r| all_headers(&r.headers, name))
            .unwrap_or_default()
    }

    /// The response body the client got.
    pub fn body(&self) -> &[u8] {
        self.response.as_ref().map_or(&[], |r| r.body.as_slice())
    }

    /// The response body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(self.body()).with_context(|| {
            format!(
                "the response body is not JSON: {}",
                String::from_utf8_lossy(self.body())
            )
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Host state
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone)]
struct MetricEntry {
    name: String,
    kind: MetricKind,
    value: i64,
}

#[derive(Debug, Default)]
struct Metrics {
    by_name: HashMap<String, u32>,
    by_id: BTreeMap<u32, MetricEntry>,
    defined: u32,
}

/// One HTTP stream's state, while the host runs it.
#[derive(Debug, Default)]
struct Stream {
    request_headers: Headers,
    request_headers_open: bool,
    response_headers: Headers,
    response_headers_open: bool,
    /// The body buffer the current body callback sees (request or response).
    body: Vec<u8>,
    body_open: Option<i32>,
    /// Request and response headers readable, not writable, as in Envoy's access-log phase.
    log_phase: bool,
    local_response: Option<LocalResponse>,
    continued: Vec<i32>,
    reset: bool,
}

struct HostState {
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    now_nanos: u64,
    logs: Vec<(LogLevel, String)>,
    notes: Vec<String>,
    echo_logs: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    metrics: Metrics,
    shared: SharedData,
    properties: HashMap<Vec<u8>, Vec<u8>>,
    tick_period_ms: u32,
    rng: u64,
    memory: Option<Memory>,
    alloc: Option<TypedFunc<i32, i32>>,
    stream: Option<Stream>,
    effective_context: u32,
    http_calls: BTreeMap<u32, HttpCall>,
    last_call_token: u32,
    known_clusters: Option<Vec<String>>,
    call_response: Option<CallResponse>,
    /// The root's `proxy_on_done` answered false.
    done_pending: bool,
    /// ... and it then called `proxy_done`.
    done_called: bool,
}

impl HostState {
    fn new(plugin_config: &[u8], shared: &SharedData) -> HostState {
        HostState {
            plugin_config: plugin_config.to_vec(),
            vm_config: Vec::new(),
            now_nanos: DEFAULT_START_UNIX_SECONDS * NANOS_PER_SECOND,
            logs: Vec::new(),
            notes: Vec::new(),
            echo_logs: std::env::var_os("TOLLGATE_WASM_HOST_LOG").is_some(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            metrics: Metrics::default(),
            shared: shared.clone(),
            // Envoy's node id, as Istio sets it for a sidecar (the filter names its batches
            // after it when the configuration names no instance).
            properties: HashMap::from([(b"node\0id".to_vec(), TEST_NODE_ID.as_bytes().to_vec())]),
            tick_period_ms: 0,
            // Every VM draws the same random bytes: runs are reproducible.
            // Each VM its own stream, as each Envoy VM draws from the system's randomness;
            // still reproducible from run to run.
            rng: 0x9E37_79B9_7F4A_7C15
                ^ VMS_STARTED
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    .wrapping_mul(0xD1B5_4A32_D192_ED03),
            memory: None,
            alloc: None,
            stream: None,
            effective_context: ROOT_CONTEXT_ID,
            http_calls: BTreeMap::new(),
            last_call_token: 0,
            known_clusters: None,
            call_response: None,
            done_pending: false,
            done_called: false,
        }
    }

    fn log(&mut self, level: LogLevel, message: String) {
        if self.echo_logs {
            eprintln!("[wasm {level}] {message}");
        }
        self.logs.push((level, message));
    }

    fn note(&mut self, note: String) {
        if self.echo_logs {
            eprintln!("[host] {note}");
        }
        self.notes.push(note);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic per VM, good enough for hash seeds.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The header map `map_type` if Envoy would expose it now, else the status Envoy returns.
    fn map(&mut self, map_type: i32, write: bool) -> Result<&mut Headers, i32> {
        if !(0..=MAP_MAX).contains(&map_type) {
            return Err(BAD_ARGUMENT);
        }
        if map_type == MAP_HTTP_CALL_RESPONSE_HEADERS || map_type == MAP_HTTP_CALL_RESPONSE_TRAILERS
        {
            // Only while a successful answer is being delivered, as in Envoy; read-only here.
            return match self.call_response.as_mut() {
                Some(CallResponse {
                    headers: Some(headers),
                    ..
                }) if !write && map_type == MAP_HTTP_CALL_RESPONSE_HEADERS => Ok(headers),
                _ => Err(BAD_ARGUMENT),
            };
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(BAD_ARGUMENT);
        };
        let missing = if stream.log_phase {
            NOT_FOUND
        } else {
            BAD_ARGUMENT
        };
        let readable_in_log = stream.log_phase && !write;
        match map_type {
            MAP_HTTP_REQUEST_HEADERS if stream.request_headers_open || readable_in_log => {
                Ok(&mut stream.request_headers)
            }
            MAP_HTTP_RESPONSE_HEADERS if stream.response_headers_open || readable_in_log => {
                Ok(&mut stream.response_headers)
            }
            MAP_HTTP_REQUEST_TRAILERS | MAP_HTTP_RESPONSE_TRAILERS => Err(missing),
            _ => Err(missing),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------------------------

type Ctx<'a> = Caller<'a, HostState>;

fn read_mem(caller: &Ctx<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let memory = caller.data().memory?;
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    memory.data(caller).get(start..end).map(<[u8]>::to_vec)
}

fn write_mem(caller: &mut Ctx<'_>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(memory) = caller.data().memory else {
        return false;
    };
    memory.write(caller, ptr as u32 as usize, bytes).is_ok()
}

fn write_u32(caller: &mut Ctx<'_>, ptr: i32, value: u32) -> bool {
    write_mem(caller, ptr, &value.to_le_bytes())
}

fn write_u64(caller: &mut Ctx<'_>, ptr: i32, value: u64) -> bool {
    write_mem(caller, ptr, &value.to_le_bytes())
}

/// Copy `bytes` into memory the guest allocates, and store its address and size at
/// `ptr_ptr` / `size_ptr` (proxy-wasm-cpp-host's `copyToPointerSize`: nothing is allocated
/// for an empty value, the address is then 0).
fn copy_out(
    caller: &mut Ctx<'_>,
    bytes: &[u8],
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let Ok(size) = u32::try_from(bytes.len()) else {
        return Ok(BAD_ARGUMENT);
    };
    let mut address = 0u32;
    if size > 0 {
        let Some(alloc) = caller.data().alloc.clone() else {
            return Ok(INTERNAL_FAILURE);
        };
        let Ok(guest_size) = i32::try_from(size) else {
            return Ok(BAD_ARGUMENT);
        };
        let pointer = alloc.call(&mut *caller, guest_size)?;
        if pointer == 0 {
            return Ok(INTERNAL_FAILURE);
        }
        if !write_mem(caller, pointer, bytes) {
            return Ok(INVALID_MEMORY_ACCESS);
        }
        address = pointer as u32;
    }
    if !write_u32(caller, ptr_ptr, address) || !write_u32(caller, size_ptr, size) {
        return Ok(INVALID_MEMORY_ACCESS);
    }
    Ok(OK)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    let word: [u8; 4] = word.try_into().ok()?;
    Some(u32::from_le_bytes(word) as usize)
}

/// Parse the proxy-wasm pairs format: count, (key size, value size) per pair, then each key
/// and value followed by a NUL.
fn parse_pairs(bytes: &[u8]) -> Option<Headers> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    let mut data = count.checked_mul(8)?.checked_add(4)?;
    let mut pairs = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let sizes = 4 + i * 8;
        let (key_len, value_len) = (u32_at(bytes, sizes)?, u32_at(bytes, sizes + 4)?);
        let key = bytes.get(data..data.checked_add(key_len)?)?;
        data = data.checked_add(key_len + 1)?;
        let value = bytes.get(data..data.checked_add(value_len)?)?;
        data = data.checked_add(value_len + 1)?;
        pairs.push((lower(key), value.to_vec()));
    }
    Some(pairs)
}

fn serialize_pairs(pairs: &Headers) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (name, value) in pairs {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value);
        out.push(0);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Imports
// ---------------------------------------------------------------------------------------------

/// The status of a call that wrote to guest memory.
fn written(ok: bool) -> i32 {
    if ok {
        OK
    } else {
        INVALID_MEMORY_ACCESS
    }
}

fn wasi_written(ok: bool) -> i32 {
    if ok {
        WASI_ESUCCESS
    } else {
        WASI_EFAULT
    }
}

/// Register host functions under their own names.
macro_rules! link {
    ($linker:expr, $module:expr, [$($function:ident),* $(,)?]) => {
        $( $linker.func_wrap($module, stringify!($function), $function).map_err(wt)?; )*
    };
}

fn link_wasi(linker: &mut Linker<HostState>) -> Result<()> {
    use wasi::*;
    link!(
        linker,
        "wasi_snapshot_preview1",
        [
            random_get,
            environ_get,
            environ_sizes_get,
            clock_time_get,
            fd_write,
            proc_exit,
        ]
    );
    Ok(())
}

/// The WASI functions a `wasm32-wasip1` Rust module imports.
mod wasi {
    use super::*;

    pub fn random_get(mut c: Ctx<'_>, buf: i32, len: i32) -> wasmtime::Result<i32> {
        let len = len as u32 as usize;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&c.data_mut().next_random().to_le_bytes());
        }
        bytes.truncate(len);
        Ok(wasi_written(write_mem(&mut c, buf, &bytes)))
    }

    pub fn environ_get(_c: Ctx<'_>, _environ: i32, _buf: i32) -> wasmtime::Result<i32> {
        Ok(WASI_ESUCCESS)
    }

    pub fn environ_sizes_get(mut c: Ctx<'_>, count: i32, size: i32) -> wasmtime::Result<i32> {
        Ok(wasi_written(
            write_u32(&mut c, count, 0) && write_u32(&mut c, size, 0),
        ))
    }

    pub fn clock_time_get(
        mut c: Ctx<'_>,
        id: i32,
        _precision: i64,
        out: i32,
    ) -> wasmtime::Result<i32> {
        // Realtime, monotonic, process and thread CPU time: all read the fake clock.
        if !(0..=3).contains(&id) {
            return Ok(WASI_EINVAL);
        }
        let now = c.data().now_nanos;
        Ok(wasi_written(write_u64(&mut c, out, now)))
    }

    /// stdout and stderr become log lines (`[stdout] ...` at Info, `[stderr] ...` at Error).
    pub fn fd_write(
        mut c: Ctx<'_>,
        fd: i32,
        iovs: i32,
        iovs_len: i32,
        written: i32,
    ) -> wasmtime::Result<i32> {
        if fd != 1 && fd != 2 {
            return Ok(WASI_EBADF);
        }
        let mut data = Vec::new();
        for i in 0..iovs_len.max(0) {
            let Some(iov) = read_mem(&c, iovs.wrapping_add(i.wrapping_mul(8)), 8) else {
                return Ok(WASI_EFAULT);
            };
            let (Some(ptr), Some(len)) = (u32_at(&iov, 0), u32_at(&iov, 4)) else {
                return Ok(WASI_EFAULT);
            };
            let Some(bytes) = read_mem(&c, ptr as i32, len as i32) else {
                return Ok(WASI_EFAULT);
            };
            data.extend_from_slice(&bytes);
        }
        if !write_u32(&mut c, written, data.len() as u32) {
            return Ok(WASI_EFAULT);
        }
        let state = c.data_mut();
        let (stream, level, buffer) = if fd == 1 {
            ("stdout", LogLevel::Info, &mut state.stdout)
        } else {
            ("stderr", LogLevel::Error, &mut state.stderr)
        };
        buffer.extend_from_slice(&data);
        let mut lines = Vec::new();
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        for line in lines {
            state.log(level, format!("[{stream}] {line}"));
        }
        Ok(WASI_ESUCCESS)
    }

    pub fn proc_exit(_c: Ctx<'_>, code: i32) -> wasmtime::Result<()> {
        Err(wasmtime::Error::msg(format!(
            "the filter called proc_exit({code})"
        )))
    }
}

fn link_proxy(linker: &mut Linker<HostState>) -> Result<()> {
    link!(
        linker,
        "env",
        [
            // Logging, time, ticks.
            proxy_log,
            proxy_get_log_level,
            proxy_get_current_time_nanoseconds,
            proxy_set_tick_period_milliseconds,
            // Buffers and header maps.
            proxy_get_buffer_bytes,
            proxy_set_buffer_bytes,
            proxy_get_header_map_pairs,
            proxy_set_header_map_pairs,
            proxy_get_header_map_value,
            proxy_replace_header_map_value,
            proxy_add_header_map_value,
            proxy_remove_header_map_value,
            // Properties, shared data, metrics.
            proxy_get_property,
            proxy_set_property,
            proxy_get_shared_data,
            proxy_set_shared_data,
            proxy_define_metric,
            proxy_increment_metric,
            proxy_record_metric,
            proxy_get_metric,
            // Stream control.
            proxy_send_local_response,
            proxy_continue_stream,
            proxy_close_stream,
            proxy_get_status,
            proxy_set_effective_context,
            proxy_done,
            // HTTP calls out (answered by the test).
            proxy_http_call,
            // Not offered by this host: gRPC, queues, foreign functions. They answer with an
            // error status, never a trap (the Rust SDK panics on some, which would show).
            proxy_grpc_call,
            proxy_grpc_stream,
            proxy_grpc_send,
            proxy_grpc_cancel,
            proxy_grpc_close,
            proxy_register_shared_queue,
            proxy_resolve_shared_queue,
            proxy_enqueue_shared_queue,
            proxy_dequeue_shared_queue,
            proxy_call_foreign_function,
        ]
    );
    Ok(())
}

fn proxy_log(mut c: Ctx<'_>, level: i32, ptr: i32, len: i32) -> wasmtime::Result<i32> {
    let Some(message) = read_mem(&c, ptr, len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let message = String::from_utf8_lossy(&message).into_owned();
    c.data_mut().log(LogLevel::from_abi(level), message);
    Ok(OK)
}

fn proxy_get_log_level(mut c: Ctx<'_>, out: i32) -> wasmtime::Result<i32> {
    Ok(written(write_u32(&mut c, out, 0)))
}

fn proxy_get_current_time_nanoseconds(mut c: Ctx<'_>, out: i32) -> wasmtime::Result<i32> {
    let now = c.data().now_nanos;
    Ok(written(write_u64(&mut c, out, now)))
}

fn proxy_set_tick_period_milliseconds(mut c: Ctx<'_>, period: i32) -> wasmtime::Result<i32> {
    c.data_mut().tick_period_ms = period as u32;
    Ok(OK)
}

fn proxy_get_buffer_bytes(
    mut c: Ctx<'_>,
    kind: i32,
    start: i32,
    max: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    if !(0..=BUFFER_MAX).contains(&kind) {
        return Ok(BAD_ARGUMENT);
    }
    let state = c.data();
    let buffer = match kind {
        BUFFER_PLUGIN_CONFIGURATION => Some(state.plugin_config.clone()),
        BUFFER_HTTP_CALL_RESPONSE_BODY => state.call_response.as_ref().and_then(|r| r.body.clone()),
        BUFFER_VM_CONFIGURATION => Some(state.vm_config.clone()),
        BUFFER_HTTP_REQUEST_BODY | BUFFER_HTTP_RESPONSE_BODY => state
            .stream
            .as_ref()
            .filter(|s| s.body_open == Some(kind))
            .map(|s| s.body.clone()),
        _ => None,
    };
    let Some(buffer) = buffer else {
        return Ok(NOT_FOUND);
    };
    let (start, max) = (start as u32 as usize, max as u32 as usize);
    if start > buffer.len() {
        return Ok(BAD_ARGUMENT);
    }
    let end = start.saturating_add(max).min(buffer.len());
    let slice = buffer.get(start..end).unwrap_or_default();
    if slice.is_empty() {
        // Envoy answers Ok without touching the out-parameters.
        return Ok(OK);
    }
    copy_out(&mut c, slice, ptr_ptr, size_ptr)
}

fn proxy_set_buffer_bytes(
    mut c: Ctx<'_>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    let Some(data) = read_mem(&c, ptr, len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let stream = c.data_mut().stream.as_mut();
    let Some(stream) = stream.filter(|s| s.body_open == Some(kind)) else {
        return Ok(NOT_FOUND);
    };
    let (start, size) = (start as u32 as usize, size as u32 as usize);
    // Envoy's Buffer::copyFrom: replace a prefix, or append.
    if start == 0 {
        let drained = size.min(stream.body.len());
        stream.body.splice(..drained, data);
        Ok(OK)
    } else if start >= stream.body.len() {
        stream.body.extend_from_slice(&data);
        Ok(OK)
    } else {
        Ok(BAD_ARGUMENT)
    }
}

fn proxy_get_header_map_pairs(
    mut c: Ctx<'_>,
    kind: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let pairs = match c.data_mut().map(kind, false) {
        Ok(map) => serialize_pairs(map),
        Err(status) => return Ok(status),
    };
    copy_out(&mut c, &pairs, ptr_ptr, size_ptr)
}

fn proxy_set_header_map_pairs(
    mut c: Ctx<'_>,
    kind: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    let Some(bytes) = read_mem(&c, ptr, len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let Some(pairs) = parse_pairs(&bytes) else {
        return Ok(SERIALIZATION_FAILURE);
    };
    Ok(match c.data_mut().map(kind, true) {
        Ok(map) => {
            *map = pairs;
            OK
        }
        Err(status) => status,
    })
}

fn proxy_get_header_map_value(
    mut c: Ctx<'_>,
    kind: i32,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(key) = read_mem(&c, key_ptr, key_len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let key = lower(&key);
    let value = match c.data_mut().map(kind, false) {
        // Envoy hands out the first copy.
        Ok(map) => map.iter().find(|(n, _)| *n == key).map(|(_, v)| v.clone()),
        Err(status) => return Ok(status),
    };
    match value {
        Some(value) => copy_out(&mut c, &value, ptr_ptr, size_ptr),
        None => Ok(NOT_FOUND),
    }
}

/// Apply `edit` to the map with the key and value the guest passed.
fn edit_map(
    c: &mut Ctx<'_>,
    kind: i32,
    key: (i32, i32),
    value: (i32, i32),
    edit: impl FnOnce(&mut Headers, String, Vec<u8>),
) -> i32 {
    let (Some(key), Some(value)) = (read_mem(c, key.0, key.1), read_mem(c, value.0, value.1))
    else {
        return INVALID_MEMORY_ACCESS;
    };
    match c.data_mut().map(kind, true) {
        Ok(map) => {
            edit(map, lower(&key), value);
            OK
        }
        Err(status) => status,
    }
}

fn proxy_replace_header_map_value(
    mut c: Ctx<'_>,
    kind: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    Ok(edit_map(
        &mut c,
        kind,
        (key_ptr, key_len),
        (ptr, len),
        |map, key, value| {
            // Every copy goes; one value takes their place.
            map.retain(|(n, _)| *n != key);
            map.push((key, value));
        },
    ))
}

fn proxy_add_header_map_value(
    mut c: Ctx<'_>,
    kind: i32,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<i32> {
    Ok(edit_map(
        &mut c,
        kind,
        (key_ptr, key_len),
        (ptr, len),
        |map, key, value| {
            map.push((key, value));
        },
    ))
}

fn proxy_remove_header_map_value(
    mut c: Ctx<'_>,
    kind: i32,
    key_ptr: i32,
    key_len: i32,
) -> wasmtime::Result<i32> {
    Ok(edit_map(
        &mut c,
        kind,
        (key_ptr, key_len),
        (0, 0),
        |map, key, _| {
            map.retain(|(n, _)| *n != key);
        },
    ))
}

fn proxy_get_property(
    mut c: Ctx<'_>,
    ptr: i32,
    len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(path) = read_mem(&c, ptr, len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    match c.data().properties.get(&path).cloned() {
        Some(value) => copy_out(&mut c, &value, ptr_ptr, size_ptr),
        None => Ok(NOT_FOUND),
    }
}

fn proxy_set_property(
    mut c: Ctx<'_>,
    ptr: i32,
    len: i32,
    value_ptr: i32,
    value_len: i32,
) -> wasmtime::Result<i32> {
    let (Some(path), Some(value)) = (read_mem(&c, ptr, len), read_mem(&c, value_ptr, value_len))
    else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    c.data_mut().properties.insert(path, value);
    Ok(OK)
}

fn proxy_get_shared_data(
    mut c: Ctx<'_>,
    key_ptr: i32,
    key_len: i32,
    ptr_ptr: i32,
    size_ptr: i32,
    cas_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(key) = read_mem(&c, key_ptr, key_len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let key = String::from_utf8_lossy(&key).into_owned();
    // The lock is released before the guest allocates.
    let Some((value, cas)) = c.data().shared.get(&key) else {
        return Ok(NOT_FOUND);
    };
    let status = copy_out(&mut c, &value, ptr_ptr, size_ptr)?;
    if status != OK {
        return Ok(status);
    }
    Ok(written(write_u32(&mut c, cas_ptr, cas)))
}

fn proxy_set_shared_data(
    c: Ctx<'_>,
    key_ptr: i32,
    key_len: i32,
    ptr: i32,
    len: i32,
    cas: i32,
) -> wasmtime::Result<i32> {
    let (Some(key), Some(value)) = (read_mem(&c, key_ptr, key_len), read_mem(&c, ptr, len)) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let key = String::from_utf8_lossy(&key).into_owned();
    Ok(match c.data().shared.set(&key, &value, cas as u32) {
        Some(_) => OK,
        None => CAS_MISMATCH,
    })
}

fn proxy_define_metric(
    mut c: Ctx<'_>,
    kind: i32,
    ptr: i32,
    len: i32,
    id_ptr: i32,
) -> wasmtime::Result<i32> {
    let kind = match kind {
        0 => MetricKind::Counter,
        1 => MetricKind::Gauge,
        2 => MetricKind::Histogram,
        _ => return Ok(BAD_ARGUMENT),
    };
    let Some(name) = read_mem(&c, ptr, len) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let name = String::from_utf8_lossy(&name).into_owned();
    let metrics = &mut c.data_mut().metrics;
    let id = match metrics.by_name.get(&name) {
        Some(id) if metrics.by_id.get(id).map(|m| m.kind) == Some(kind) => *id,
        Some(_) => return Ok(BAD_ARGUMENT),
        None => {
            metrics.defined += 1;
            // As in Envoy, the low two bits of an id carry the metric type.
            let id = (metrics.defined << 2) | kind as u32;
            metrics.by_name.insert(name.clone(), id);
            metrics.by_id.insert(
                id,
                MetricEntry {
                    name,
                    kind,
                    value: 0,
                },
            );
            id
        }
    };
    Ok(written(write_u32(&mut c, id_ptr, id)))
}

fn proxy_increment_metric(mut c: Ctx<'_>, id: i32, offset: i64) -> wasmtime::Result<i32> {
    let Some(metric) = c.data_mut().metrics.by_id.get_mut(&(id as u32)) else {
        return Ok(NOT_FOUND);
    };
    match metric.kind {
        // Envoy's counters only grow.
        MetricKind::Counter if offset > 0 => metric.value = metric.value.saturating_add(offset),
        MetricKind::Gauge => metric.value = metric.value.saturating_add(offset),
        _ => return Ok(BAD_ARGUMENT),
    }
    Ok(OK)
}

fn proxy_record_metric(mut c: Ctx<'_>, id: i32, value: i64) -> wasmtime::Result<i32> {
    let Some(metric) = c.data_mut().metrics.by_id.get_mut(&(id as u32)) else {
        return Ok(NOT_FOUND);
    };
    match metric.kind {
        MetricKind::Counter => metric.value = metric.value.saturating_add(value),
        MetricKind::Gauge | MetricKind::Histogram => metric.value = value,
    }
    Ok(OK)
}

fn proxy_get_metric(mut c: Ctx<'_>, id: i32, out: i32) -> wasmtime::Result<i32> {
    let Some(value) = c.data().metrics.by_id.get(&(id as u32)).map(|m| m.value) else {
        return Ok(NOT_FOUND);
    };
    Ok(written(write_u64(&mut c, out, value as u64)))
}

#[allow(clippy::too_many_arguments)]
fn proxy_send_local_response(
    mut c: Ctx<'_>,
    status: i32,
    details_ptr: i32,
    details_len: i32,
    body_ptr: i32,
    body_len: i32,
    headers_ptr: i32,
    headers_len: i32,
    grpc_status: i32,
) -> wasmtime::Result<i32> {
    let (Some(details), Some(body), Some(headers)) = (
        read_mem(&c, details_ptr, details_len),
        read_mem(&c, body_ptr, body_len),
        read_mem(&c, headers_ptr, headers_len),
    ) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let Some(headers) = parse_pairs(&headers) else {
        return Ok(SERIALIZATION_FAILURE);
    };
    let response = LocalResponse {
        status: status as u32,
        headers,
        body,
        details: String::from_utf8_lossy(&details).into_owned(),
        grpc_status,
    };
    let state = c.data_mut();
    match state.stream.as_mut() {
        // Envoy sends the first; a second reply on the same stream goes nowhere.
        Some(stream) if stream.local_response.is_none() => stream.local_response = Some(response),
        Some(_) => state.note(format!(
            "a second local response ({status}) on one stream was ignored"
        )),
        None => state.note(format!(
            "a local response ({status}) outside any stream was ignored"
        )),
    }
    Ok(OK)
}

fn proxy_continue_stream(mut c: Ctx<'_>, kind: i32) -> wasmtime::Result<i32> {
    if !(0..=STREAM_MAX).contains(&kind) {
        return Ok(BAD_ARGUMENT);
    }
    Ok(match c.data_mut().stream.as_mut() {
        Some(stream) => {
            stream.continued.push(kind);
            OK
        }
        None => BAD_ARGUMENT,
    })
}

fn proxy_close_stream(mut c: Ctx<'_>, kind: i32) -> wasmtime::Result<i32> {
    Ok(match c.data_mut().stream.as_mut() {
        Some(stream) if kind == STREAM_HTTP_REQUEST || kind == STREAM_HTTP_RESPONSE => {
            stream.reset = true;
            OK
        }
        _ => BAD_ARGUMENT,
    })
}

fn proxy_get_status(
    mut c: Ctx<'_>,
    code_ptr: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(written(
        write_u32(&mut c, code_ptr, 0)
            && write_u32(&mut c, ptr_ptr, 0)
            && write_u32(&mut c, size_ptr, 0),
    ))
}

fn proxy_set_effective_context(mut c: Ctx<'_>, id: i32) -> wasmtime::Result<i32> {
    // Like Envoy: only a live context can be made effective (a finished stream is gone).
    if id as u32 != ROOT_CONTEXT_ID && c.data().stream.is_none() {
        return Ok(BAD_ARGUMENT);
    }
    c.data_mut().effective_context = id as u32;
    Ok(OK)
}

fn proxy_done(mut c: Ctx<'_>) -> wasmtime::Result<i32> {
    let state = c.data_mut();
    // Envoy: only a root context whose on_done answered false is waiting for this.
    if !state.done_pending || state.done_called {
        state.note("proxy_done called while no root context was pending done".to_string());
        return Ok(NOT_FOUND);
    }
    state.done_called = true;
    Ok(OK)
}

#[allow(clippy::too_many_arguments)]
fn proxy_http_call(
    mut c: Ctx<'_>,
    upstream: i32,
    upstream_len: i32,
    headers: i32,
    headers_len: i32,
    body: i32,
    body_len: i32,
    trailers: i32,
    trailers_len: i32,
    timeout: i32,
    token_ptr: i32,
) -> wasmtime::Result<i32> {
    let (Some(upstream), Some(headers), Some(body), Some(trailers)) = (
        read_mem(&c, upstream, upstream_len),
        read_mem(&c, headers, headers_len),
        read_mem(&c, body, body_len),
        read_mem(&c, trailers, trailers_len),
    ) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let (Some(headers), Some(trailers)) = (parse_pairs(&headers), parse_pairs(&trailers)) else {
        return Ok(SERIALIZATION_FAILURE);
    };
    let upstream = String::from_utf8_lossy(&upstream).into_owned();
    let state = c.data_mut();
    let known = state
        .known_clusters
        .as_ref()
        .is_none_or(|clusters| clusters.contains(&upstream));
    let has = |name: &str| headers.iter().any(|(n, _)| n == name);
    // Envoy's Context::httpCall: unknown cluster, negative timeout, or a missing pseudo-header.
    if !known || timeout < 0 || !has(":method") || !has(":path") || !has(":authority") {
        return Ok(BAD_ARGUMENT);
    }
    state.last_call_token += 1;
    let token = state.last_call_token;
    state.http_calls.insert(
        token,
        HttpCall {
            token,
            upstream,
            headers,
            body,
            trailers,
            timeout: Duration::from_millis(u64::from(timeout as u32)),
        },
    );
    Ok(written(write_u32(&mut c, token_ptr, token)))
}

#[allow(clippy::too_many_arguments)]
fn proxy_grpc_call(
    _c: Ctx<'_>,
    _upstream: i32,
    _upstream_len: i32,
    _service: i32,
    _service_len: i32,
    _method: i32,
    _method_len: i32,
    _metadata: i32,
    _metadata_len: i32,
    _message: i32,
    _message_len: i32,
    _timeout: i32,
    _token_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(UNIMPLEMENTED)
}

#[allow(clippy::too_many_arguments)]
fn proxy_grpc_stream(
    _c: Ctx<'_>,
    _upstream: i32,
    _upstream_len: i32,
    _service: i32,
    _service_len: i32,
    _method: i32,
    _method_len: i32,
    _metadata: i32,
    _metadata_len: i32,
    _token_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(UNIMPLEMENTED)
}

fn proxy_grpc_send(
    _c: Ctx<'_>,
    _token: i32,
    _ptr: i32,
    _len: i32,
    _end: i32,
) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

fn proxy_grpc_cancel(_c: Ctx<'_>, _token: i32) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

fn proxy_grpc_close(_c: Ctx<'_>, _token: i32) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

fn proxy_enqueue_shared_queue(
    _c: Ctx<'_>,
    _id: i32,
    _ptr: i32,
    _len: i32,
) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

fn proxy_register_shared_queue(
    _c: Ctx<'_>,
    _name: i32,
    _len: i32,
    _id_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(UNIMPLEMENTED)
}

fn proxy_resolve_shared_queue(
    _c: Ctx<'_>,
    _vm_id: i32,
    _vm_id_len: i32,
    _name: i32,
    _name_len: i32,
    _id_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

fn proxy_dequeue_shared_queue(
    _c: Ctx<'_>,
    _id: i32,
    _ptr_ptr: i32,
    _size_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(EMPTY)
}

fn proxy_call_foreign_function(
    _c: Ctx<'_>,
    _name: i32,
    _name_len: i32,
    _args: i32,
    _args_len: i32,
    _ptr_ptr: i32,
    _size_ptr: i32,
) -> wasmtime::Result<i32> {
    Ok(NOT_FOUND)
}

/// wasmtime's error type is not `anyhow`'s: keep its full report (chain and wasm backtrace).
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("{e:?}")
}

// ---------------------------------------------------------------------------------------------
// The host and its VMs
// ---------------------------------------------------------------------------------------------

/// The compiled filter and the imports it links against; start any number of [`Vm`]s.
pub struct FilterHost {
    engine: Engine,
    module: Module,
    linker: Linker<HostState>,
}

impl fmt::Debug for FilterHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterHost").finish_non_exhaustive()
    }
}

impl FilterHost {
    /// Compile the `.wasm` at `path` and link the host's imports.
    pub fn load(path: impl AsRef<Path>) -> Result<FilterHost> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "reading the filter at {} (build it with `cargo build -p tollgate-filter --target wasm32-wasip1 --release`)",
                path.display()
            )
        })?;
        let mut config = Config::new();
        config.cranelift_opt_level(wasmtime::OptLevel::None);
        let engine = Engine::new(&config).map_err(wt)?;
        let module = Module::from_binary(&engine, &bytes)
            .map_err(wt)
            .with_context(|| format!("compiling {}", path.display()))?;
        let mut linker = Linker::new(&engine);
        link_wasi(&mut linker)?;
        link_proxy(&mut linker)?;
        let host = FilterHost {
            engine,
            module,
            linker,
        };
        host.check_imports()?;
        Ok(host)
    }

    /// The release filter at [`crate::filter_wasm_path`], compiled once per process.
    pub fn shared() -> Result<&'static FilterHost> {
        static HOST: OnceLock<std::result::Result<FilterHost, String>> = OnceLock::new();
        HOST.get_or_init(|| {
            FilterHost::load(crate::filter_wasm_path()).map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
    }

    /// Every import of the module has a definition (names them all at once if not).
    fn check_imports(&self) -> Result<()> {
        let mut store = Store::new(&self.engine, HostState::new(b"", &SharedData::new()));
        let missing: Vec<String> = self
            .module
            .imports()
            .filter(|import| {
                self.linker
                    .get(&mut store, import.module(), import.name())
                    .is_err()
            })
            .map(|import| format!("{}::{}", import.module(), import.name()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "the host does not implement these imports of the filter: {}",
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// Start a VM with `plugin_config`; fails (with the VM's log in the message) if the
    /// filter rejects the configuration or traps.
    pub fn start(&self, plugin_config: &str, shared: &SharedData) -> Result<Vm> {
        let vm = self.start_unchecked(plugin_config, shared)?;
        if let Some(trap) = vm.trap() {
            bail!(
                "the filter trapped while starting: {trap}\nVM log:\n{}",
                vm.log_text()
            );
        }
        if !vm.configured() {
            bail!("the filter rejected its configuration (proxy_on_configure returned false)\nVM log:\n{}", vm.log_text());
        }
        Ok(vm)
    }

    /// Start a VM and return it whatever `proxy_on_vm_start` / `proxy_on_configure` say (see
    /// [`Vm::configured`], [`Vm::trapped`]); fails only if the module cannot be instantiated
    /// or `_initialize` traps.
    pub fn start_unchecked(&self, plugin_config: &str, shared: &SharedData) -> Result<Vm> {
        self.start_bytes(plugin_config.as_bytes(), shared)
    }

    /// [`FilterHost::start_unchecked`] with a configuration that need not be UTF-8.
    pub fn start_bytes(&self, plugin_config: &[u8], shared: &SharedData) -> Result<Vm> {
        let mut store = Store::new(&self.engine, HostState::new(plugin_config, shared));
        let instance = self
            .linker
            .instantiate(&mut store, &self.module)
            .map_err(wt)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| anyhow!("the filter exports no memory"))?;
        if instance
            .get_func(&mut store, "proxy_abi_version_0_2_1")
            .is_none()
        {
            bail!("the filter does not export proxy_abi_version_0_2_1: not proxy-wasm ABI 0.2.1");
        }
        let exports = Exports::find(&instance, &mut store)?;
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = Some(exports.memory_allocate.clone());
        let mut vm = Vm {
            store,
            exports,
            memory,
            next_context_id: ROOT_CONTEXT_ID + 1,
            vm_started: false,
            configured: false,
            trap: None,
            finished: false,
        };
        if let Some(initialize) = vm.exports.initialize.clone() {
            vm.guard("_initialize", |store| initialize.call(store, ()))?;
        }
        let root = ROOT_CONTEXT_ID as i32;
        let create = vm.exports.context_create.clone();
        let vm_start = vm.exports.vm_start.clone();
        let vm_config_len = vm.store.data().vm_config.len() as i32;
        // A trap from here on is recorded on the VM for the caller to inspect.
        let started = vm
            .guard("proxy_on_context_create", |store| {
                create.call(store, (root, 0))
            })
            .and_then(|()| {
                vm.guard("proxy_on_vm_start", |store| {
                    vm_start.call(store, (root, vm_config_len))
                })
            });
        vm.vm_started = matches!(started, Ok(v) if v != 0);
        if vm.vm_started {
            let _ = vm.configure_current();
        }
        Ok(vm)
    }
}

#[derive(Clone)]
struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    memory_allocate: TypedFunc<i32, i32>,
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    tick: TypedFunc<i32, ()>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    request_body: TypedFunc<(i32, i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    response_body: TypedFunc<(i32, i32, i32), i32>,
    log: TypedFunc<i32, ()>,
    http_call_response: TypedFunc<(i32, i32, i32, i32, i32), ()>,
    done: TypedFunc<i32, i32>,
    delete: TypedFunc<i32, ()>,
}

impl Exports {
    fn find(instance: &Instance, store: &mut Store<HostState>) -> Result<Exports> {
        fn get<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
            instance: &Instance,
            store: &mut Store<HostState>,
            name: &str,
        ) -> Result<TypedFunc<P, R>> {
            instance
                .get_typed_func::<P, R>(&mut *store, name)
                .map_err(wt)
                .with_context(|| format!("export `{name}`"))
        }
        Ok(Exports {
            initialize: instance
                .get_typed_func::<(), ()>(&mut *store, "_initialize")
                .ok(),
            memory_allocate: get(instance, store, "proxy_on_memory_allocate")?,
            context_create: get(instance, store, "proxy_on_context_create")?,
            vm_start: get(instance, store, "proxy_on_vm_start")?,
            configure: get(instance, store, "proxy_on_configure")?,
            tick: get(instance, store, "proxy_on_tick")?,
            request_headers: get(instance, store, "proxy_on_request_headers")?,
            request_body: get(instance, store, "proxy_on_request_body")?,
            response_headers: get(instance, store, "proxy_on_response_headers")?,
            response_body: get(instance, store, "proxy_on_response_body")?,
            log: get(instance, store, "proxy_on_log")?,
            http_call_response: get(instance, store, "proxy_on_http_call_response")?,
            done: get(instance, store, "proxy_on_done")?,
            delete: get(instance, store, "proxy_on_delete")?,
        })
    }
}

/// One instance of the filter: one Envoy worker's VM, with its root context.
pub struct Vm {
    store: Store<HostState>,
    exports: Exports,
    memory: Memory,
    next_context_id: u32,
    vm_started: bool,
    configured: bool,
    trap: Option<String>,
    finished: bool,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("configured", &self.configured)
            .field("trap", &self.trap)
            .field("now_nanos", &self.store.data().now_nanos)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Call into the guest; a failure is a trap that poisons the VM.
    fn guard<R>(
        &mut self,
        what: &str,
        call: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R> {
        if let Some(trap) = &self.trap {
            bail!("the VM trapped earlier and takes no more calls ({what}): {trap}");
        }
        if self.finished {
            bail!("the VM was shut down ({what})");
        }
        match call(&mut self.store) {
            Ok(value) => Ok(value),
            Err(e) => {
                let last = self
                    .store
                    .data()
                    .logs
                    .iter()
                    .rev()
                    .find(|(level, _)| *level == LogLevel::Critical)
                    .map(|(_, message)| format!("\nlast critical log: {message}"))
                    .unwrap_or_default();
                let message = format!("{what} trapped: {e:?}{last}");
                self.trap = Some(message.clone());
                Err(anyhow!(message))
            }
        }
    }

    fn configure_current(&mut self) -> Result<bool> {
        let root = ROOT_CONTEXT_ID as i32;
        let configure = self.exports.configure.clone();
        let len = self.store.data().plugin_config.len() as i32;
        let ok = self.guard("proxy_on_configure", |store| {
            configure.call(store, (root, len))
        })? != 0;
        self.configured = ok;
        Ok(ok)
    }

    /// Hand the root context a new plugin configuration (`proxy_on_configure` again, as on a
    /// configuration update that keeps the VM); returns what the filter answered.
    pub fn reconfigure(&mut self, plugin_config: &str) -> Result<bool> {
        self.store.data_mut().plugin_config = plugin_config.as_bytes().to_vec();
        self.configure_current()
    }

    /// `proxy_on_vm_start` and the last `proxy_on_configure` both returned true.
    pub fn configured(&self) -> bool {
        self.vm_started && self.configured
    }

    /// The filter trapped (a panic, an abort, an out-of-bounds access...).
    pub fn trapped(&self) -> bool {
        self.trap.is_some()
    }

    /// What trapped, with the wasm backtrace and the panic message if the filter logged one.
    pub fn trap(&self) -> Option<&str> {
        self.trap.as_deref()
    }

    /// The fake clock, Unix nanoseconds.
    pub fn now(&self) -> u64 {
        self.store.data().now_nanos
    }

    pub fn set_time(&mut self, unix_nanos: u64) {
        self.store.data_mut().now_nanos = unix_nanos;
    }

    pub fn advance(&mut self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let state = self.store.data_mut();
        state.now_nanos = state.now_nanos.saturating_add(by);
    }

    /// The period the filter asked for with `proxy_set_tick_period_milliseconds`.
    pub fn tick_period(&self) -> Option<Duration> {
        match self.store.data().tick_period_ms {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    /// `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<()> {
        let tick = self.exports.tick.clone();
        self.guard("proxy_on_tick", |store| {
            tick.call(store, ROOT_CONTEXT_ID as i32)
        })
    }

    /// Everything the filter logged (`proxy_log`, and stdout/stderr lines), oldest first.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.store.data().logs.clone()
    }

    /// The log as text, one `level: message` line each.
    pub fn log_text(&self) -> String {
        self.store
            .data()
            .logs
            .iter()
            .map(|(level, message)| format!("{level}: {message}\n"))
            .collect()
    }

    /// Host-side remarks about the filter's use of the ABI (ignored calls and the like).
    pub fn host_notes(&self) -> Vec<String> {
        self.store.data().notes.clone()
    }

    /// A metric's value by the name the filter defined it with; `None` if never defined.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let metrics = &self.store.data().metrics;
        let id = metrics.by_name.get(name)?;
        metrics
            .by_id
            .get(id)
            .map(|m| u64::try_from(m.value).unwrap_or(0))
    }

    /// Every defined metric and its value.
    pub fn metrics(&self) -> BTreeMap<String, i64> {
        self.store
            .data()
            .metrics
            .by_id
            .values()
            .map(|m| (m.name.clone(), m.value))
            .collect()
    }

    /// The shared-data space this VM uses.
    pub fn shared_data(&self) -> SharedData {
        self.store.data().shared.clone()
    }

    /// Bytes of linear memory the filter holds.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// End the VM as Envoy does on shutdown: `proxy_on_done` on the root context, then
    /// `proxy_on_delete` if it answered true. If it answered false, the VM stays alive for its
    /// callbacks (answer its calls with [`Vm::respond_call`] / [`Vm::fail_call`]) until the
    /// filter calls `proxy_done`, and `proxy_on_delete` follows ([`Vm::finished`]). Returns
    /// what `proxy_on_done` answered.
    pub fn shutdown(&mut self) -> Result<bool> {
        let done = self.exports.done.clone();
        let root = ROOT_CONTEXT_ID as i32;
        let finished = self.guard("proxy_on_done", |store| done.call(store, root))? != 0;
        if finished {
            self.delete_root()?;
        } else {
            self.store.data_mut().done_pending = true;
        }
        Ok(finished)
    }

    fn delete_root(&mut self) -> Result<()> {
        let delete = self.exports.delete.clone();
        let root = ROOT_CONTEXT_ID as i32;
        self.guard("proxy_on_delete", |store| delete.call(store, root))?;
        self.finished = true;
        Ok(())
    }

    /// The root context was deleted (after [`Vm::shutdown`]); the VM takes no more calls.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Clusters `proxy_http_call` may name (others are `BadArgument`); by default, any.
    pub fn set_known_clusters(&mut self, clusters: &[&str]) {
        self.store.data_mut().known_clusters =
            Some(clusters.iter().map(|c| (*c).to_string()).collect());
    }

    /// Calls the filter made that have not been answered, oldest first.
    pub fn pending_calls(&self) -> Vec<HttpCall> {
        self.store.data().http_calls.values().cloned().collect()
    }

    /// Answer call `token`: `:status` `status` plus `headers`, and `body`, delivered with
    /// `proxy_on_http_call_response` on the root context.
    pub fn respond_call(
        &mut self,
        token: u32,
        status: u16,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<()> {
        let mut map = vec![(":status".to_string(), status.to_string().into_bytes())];
        map.extend(
            headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec())),
        );
        self.deliver_call(
            token,
            CallResponse {
                headers: Some(map),
                body: Some(body.to_vec()),
            },
        )
    }

    /// Fail call `token` as Envoy reports a reset or a timeout without a response: 0 headers,
    /// 0 body bytes, no response maps.
    pub fn fail_call(&mut self, token: u32) -> Result<()> {
        self.deliver_call(token, CallResponse::default())
    }

    fn deliver_call(&mut self, token: u32, response: CallResponse) -> Result<()> {
        if self.store.data_mut().http_calls.remove(&token).is_none() {
            bail!("no call with token {token} is pending");
        }
        let n_headers = response.headers.as_ref().map_or(0, Vec::len) as i32;
        let body_size = response.body.as_ref().map_or(0, Vec::len) as i32;
        self.store.data_mut().call_response = Some(response);
        let f = self.exports.http_call_response.clone();
        let root = ROOT_CONTEXT_ID as i32;
        let result = self.guard("proxy_on_http_call_response", |store| {
            f.call(store, (root, token as i32, n_headers, body_size, 0))
        });
        self.store.data_mut().call_response = None;
        result?;
        if self.store.data().done_called && !self.finished {
            self.delete_root()?;
        }
        Ok(())
    }

    fn stream(&mut self) -> Result<&mut Stream> {
        self.store
            .data_mut()
            .stream
            .as_mut()
            .ok_or_else(|| anyhow!("no stream is running"))
    }

    fn local_sent(&mut self) -> bool {
        self.store
            .data()
            .stream
            .as_ref()
            .is_some_and(|s| s.local_response.is_some() || s.reset)
    }

    /// Did the filter resume `kind` during the last callback? (Clears the record.)
    fn take_continued(&mut self, kind: i32) -> Result<bool> {
        let stream = self.stream()?;
        let resumed = stream.continued.contains(&kind);
        stream.continued.clear();
        Ok(resumed)
    }

    /// Run one HTTP stream through the filter, as Envoy's filter chain would.
    pub fn request(&mut self, req: &Request) -> Result<Exchange> {
        if let Some(trap) = &self.trap {
            bail!("the VM trapped earlier and takes no more requests: {trap}");
        }
        let id = self.next_context_id;
        self.next_context_id += 1;
        self.store.data_mut().stream = Some(Stream {
            request_headers: req.header_map(),
            ..Stream::default()
        });
        let result = self.run_stream(id, req);
        self.store.data_mut().stream = None;
        result
    }

    fn run_stream(&mut self, id: u32, req: &Request) -> Result<Exchange> {
        let ctx = id as i32;
        let ex = self.exports.clone();
        self.guard("proxy_on_context_create", |s| {
            ex.context_create.call(s, (ctx, ROOT_CONTEXT_ID as i32))
        })?;
        let mut exchange = Exchange {
            context_id: id,
            local_response: None,
            upstream: None,
            response: None,
            stalled: false,
            reset: false,
        };

        // Request headers.
        let body: Vec<&Vec<u8>> = req.body.iter().collect();
        let end_of_stream = i32::from(body.is_empty());
        let count = {
            let stream = self.stream()?;
            stream.request_headers_open = true;
            stream.request_headers.len() as i32
        };
        let action = self.guard("proxy_on_request_headers", |s| {
            ex.request_headers.call(s, (ctx, count, end_of_stream))
        })?;
        let resumed = self.take_continued(STREAM_HTTP_REQUEST)?;
        let paused = action != ACTION_CONTINUE && !resumed;
        // Envoy lets go of the request headers once the filter continues.
        self.stream()?.request_headers_open = paused;

        let mut forwarded_body = Vec::new();
        if !self.local_sent() && paused {
            exchange.stalled = true;
        }
        if !self.local_sent() && !exchange.stalled {
            let headers_seen = self.stream()?.request_headers.clone();
            let mut buffering = false;
            for (i, chunk) in body.iter().enumerate() {
                let last = i + 1 == body.len();
                let size = {
                    let stream = self.stream()?;
                    if !buffering {
                        stream.body.clear();
                    }
                    stream.body.extend_from_slice(chunk);
                    stream.body_open = Some(BUFFER_HTTP_REQUEST_BODY);
                    stream.body.len() as i32
                };
                let action = self.guard("proxy_on_request_body", |s| {
                    ex.request_body.call(s, (ctx, size, i32::from(last)))
                })?;
                let resumed = self.take_continued(STREAM_HTTP_REQUEST)?;
                self.stream()?.body_open = None;
                if self.local_sent() {
                    break;
                }
                if action == ACTION_CONTINUE || resumed {
                    forwarded_body.append(&mut self.stream()?.body);
                    buffering = false;
                } else if last {
                    exchange.stalled = true;
                } else {
                    buffering = true;
                }
            }
            if !self.local_sent() && !exchange.stalled {
                exchange.upstream = Some(UpstreamRequest {
                    headers: headers_seen,
                    body: forwarded_body,
                });
            }
        }

        if let Some(local) = self.stream()?.local_response.clone() {
            // The local reply goes through the encoder chain, this filter included.
            exchange.response = Some(self.encode_response(
                ctx,
                local.status.try_into().unwrap_or(u16::MAX),
                &local.headers,
                std::slice::from_ref(&local.body),
                true,
            )?);
            exchange.local_response = Some(local);
        } else if exchange.upstream.is_some() {
            self.advance(req.upstream_latency);
            let response = self.encode_response(
                ctx,
                req.response_status,
                &req.response_headers,
                &req.response_body,
                false,
            )?;
            match self.stream()?.local_response.clone() {
                Some(local) => {
                    exchange.response = Some(Response {
                        status: local.status.try_into().unwrap_or(u16::MAX),
                        headers: local.headers.clone(),
                        body: local.body.clone(),
                    });
                    exchange.local_response = Some(local);
                }
                None => exchange.response = Some(response),
            }
        }
        exchange.reset = self.stream()?.reset;
        if exchange.reset || exchange.stalled {
            exchange.response = None;
        }

        // End of stream: access log, done, delete.
        {
            let stream = self.stream()?;
            stream.log_phase = true;
            stream.request_headers_open = false;
            stream.response_headers_open = false;
        }
        self.guard("proxy_on_log", |s| ex.log.call(s, ctx))?;
        self.stream()?.log_phase = false;
        self.guard("proxy_on_done", |s| ex.done.call(s, ctx))?;
        self.guard("proxy_on_delete", |s| ex.delete.call(s, ctx))?;
        Ok(exchange)
    }

    /// Response headers and body through the filter's encoder callbacks.
    fn encode_response(
        &mut self,
        ctx: i32,
        status: u16,
        headers: &Headers,
        body: &[Vec<u8>],
        local: bool,
    ) -> Result<Response> {
        let ex = self.exports.clone();
        let chunks: Vec<&Vec<u8>> = body.iter().filter(|c| !(local && c.is_empty())).collect();
        let count = {
            let stream = self.stream()?;
            let mut map = vec![(":status".to_string(), status.to_string().into_bytes())];
            map.extend(
                headers
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v.clone())),
            );
            stream.response_headers = map;
            stream.response_headers_open = true;
            stream.response_headers.len() as i32
        };
        let end_of_stream = i32::from(chunks.is_empty());
        let action = self.guard("proxy_on_response_headers", |s| {
            ex.response_headers.call(s, (ctx, count, end_of_stream))
        })?;
        let resumed = self.take_continued(STREAM_HTTP_RESPONSE)?;
        let paused = action != ACTION_CONTINUE && !resumed;
        self.stream()?.response_headers_open = paused;

        let mut delivered = Vec::new();
        let mut buffering = false;
        for (i, chunk) in chunks.iter().enumerate() {
            if !local && self.local_sent() {
                break;
            }
            let last = i + 1 == chunks.len();
            let size = {
                let stream = self.stream()?;
                if !buffering {
                    stream.body.clear();
                }
                stream.body.extend_from_slice(chunk);
                stream.body_open = Some(BUFFER_HTTP_RESPONSE_BODY);
                stream.body.len() as i32
            };
            let action = self.guard("proxy_on_response_body", |s| {
                ex.response_body.call(s, (ctx, size, i32::from(last)))
            })?;
            let resumed = self.take_continued(STREAM_HTTP_RESPONSE)?;
            self.stream()?.body_open = None;
            if action == ACTION_CONTINUE || resumed || last {
                // A paused last chunk would hang in Envoy; the host delivers what it holds.
                delivered.append(&mut self.stream()?.body);
                buffering = false;
            } else {
                buffering = true;
            }
        }
        let stream = self.stream()?;
        stream.response_headers_open = false;
        let mut headers = stream.response_headers.clone();
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(status);
        headers.retain(|(n, _)| n != ":status");
        Ok(Response {
            status,
            headers,
            body: delivered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs: Headers = vec![
            (":path".into(), b"/x".to_vec()),
            ("a".into(), b"".to_vec()),
            ("b".into(), vec![0xff, 0x00, 0x80]),
        ];
        assert_eq!(parse_pairs(&serialize_pairs(&pairs)), Some(pairs));
        assert_eq!(parse_pairs(&[]), Some(vec![]));
        assert_eq!(parse_pairs(&[1, 0, 0, 0, 9, 0, 0, 0]), None);
    }

    #[test]
    fn shared_data_follows_envoy_cas_rules() {
        let shared = SharedData::new();
        assert_eq!(shared.get("k"), None);
        let first = shared.set("k", b"1", 0).unwrap();
        assert_eq!(shared.set("k", b"2", first.wrapping_add(1)), None);
        let second = shared.set("k", b"2", first).unwrap();
        assert_ne!(first, second);
        let third = shared.set("k", b"3", 0).unwrap();
        assert_eq!(shared.get("k"), Some((b"3".to_vec(), third)));
        // A CAS on a key that does not exist yet is no obstacle (as in Envoy).
        assert!(shared.set("new", b"x", 42).is_some());
    }
}
