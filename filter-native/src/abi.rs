//! The one room with `unsafe`: Envoy 1.40's dynamic-module C ABI (ABI version v0.2.0), written
//! by hand from envoyproxy/envoy `source/extensions/dynamic_modules/abi/abi.h` and checked
//! against the 1.40 binary (the argument registers each callback reads, and Envoy's load
//! errors for a missing hook).
//!
//! Raw `#[repr(C)]` types and `extern "C"` declarations, a safe wrapper per callback, and the
//! exported hooks. Every hook runs its body under [`std::panic::catch_unwind`]: a panic that
//! crossed into Envoy would abort the process. The rest of the crate is safe Rust.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::background::{CalloutAnswer, CollectorHost, TICK_MS};
use crate::{Config, ConfigHost, Http, Stream, Wake};

/// The ABI version Envoy 1.40 matches (`Dynamic module ABI version v0.2.0 matched.`).
const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// Bytes owned by Envoy, valid for the duration of the hook or callback that handed them out.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

/// Bytes owned by the module, lent to Envoy for the duration of one callback (Envoy copies).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    const NULL: ModuleBuffer = ModuleBuffer {
        ptr: std::ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
struct ModuleHttpHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`: a header in one of Envoy's maps.
#[repr(C)]
pub struct EnvoyHttpHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;

/// `envoy_dynamic_module_type_http_body_type`: the chunk a body hook was called with.
const RECEIVED_REQUEST_BODY: u32 = 0;
const RECEIVED_RESPONSE_BODY: u32 = 2;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status`.
const HEADERS_CONTINUE: u32 = 0;
const HEADERS_STOP_ITERATION: u32 = 1;
/// Body and trailer statuses: `Continue` is 0 in each enum.
const CONTINUE: u32 = 0;
/// `..._request_body_status_StopIterationAndBuffer`.
const STOP_ITERATION_AND_BUFFER: u32 = 1;
/// `..._request_trailers_status_StopIteration`.
const TRAILERS_STOP_ITERATION: u32 = 1;

/// `envoy_dynamic_module_type_attribute_id_SourceAddress` in Envoy 1.40 (`source.address`).
const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

/// `envoy_dynamic_module_type_log_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

type FilterEnvoyPtr = *mut c_void;
type ConfigEnvoyPtr = *mut c_void;

#[cfg(not(test))]
mod raw {
    use std::ffi::c_void;

    use super::{ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr, ModuleBuffer, ModuleHttpHeader};

    // Signatures as Envoy 1.40 implements them (newer than some copies of abi.h: counters take
    // label arrays, a local reply takes a `details` buffer, buffers go by value).
    extern "C" {
        pub fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
        pub fn envoy_dynamic_module_callback_http_get_header(
            filter: FilterEnvoyPtr,
            header_type: u32,
            key: ModuleBuffer,
            result: *mut EnvoyBuffer,
            index: usize,
            optional_size: *mut usize,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_set_header(
            filter: FilterEnvoyPtr,
            header_type: u32,
            key: ModuleBuffer,
            value: ModuleBuffer,
        ) -> bool;
        /// 1.40: no result (checked in the binary: the value buffer goes on the stack).
        pub fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
            filter: FilterEnvoyPtr,
            namespace: ModuleBuffer,
            key: ModuleBuffer,
            value: ModuleBuffer,
        );
        /// 1.40: the size by value (newer headers return a bool and write through a pointer).
        pub fn envoy_dynamic_module_callback_http_get_body_size(
            filter: FilterEnvoyPtr,
            body_type: u32,
        ) -> usize;
        pub fn envoy_dynamic_module_callback_http_send_response(
            filter: FilterEnvoyPtr,
            status_code: u32,
            headers: *const ModuleHttpHeader,
            headers_size: usize,
            body: ModuleBuffer,
            details: ModuleBuffer,
        );
        pub fn envoy_dynamic_module_callback_http_filter_config_define_counter(
            config: ConfigEnvoyPtr,
            name: ModuleBuffer,
            label_names: *const ModuleBuffer,
            label_names_length: usize,
            counter_id: *mut usize,
        ) -> u32;
        /// A handle any thread may commit events through; they run the stream's `scheduled`
        /// hook on its worker, while the stream lives (Envoy holds it weakly).
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_new(
            filter: FilterEnvoyPtr,
        ) -> *mut c_void;
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
            scheduler: *mut c_void,
            event_id: u64,
        );
        pub fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
        pub fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
        pub fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter: FilterEnvoyPtr,
            attribute_id: u32,
            result: *mut EnvoyBuffer,
        ) -> bool;
        pub fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
            config: ConfigEnvoyPtr,
            name: ModuleBuffer,
            label_names: *const ModuleBuffer,
            label_names_length: usize,
            gauge_id: *mut usize,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
            config: ConfigEnvoyPtr,
            id: usize,
            label_values: *const ModuleBuffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
            config: ConfigEnvoyPtr,
            id: usize,
            label_values: *const ModuleBuffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;
        pub fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
            config: ConfigEnvoyPtr,
            id: usize,
            label_values: *const ModuleBuffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;
        /// A callout made by the configuration (on the main thread), answered through
        /// `on_http_filter_config_http_callout_done`; Envoy cancels it if the configuration
        /// is destroyed first, and then never calls back.
        pub fn envoy_dynamic_module_callback_http_filter_config_http_callout(
            config: ConfigEnvoyPtr,
            callout_id_out: *mut u64,
            cluster_name: ModuleBuffer,
            headers: *const ModuleHttpHeader,
            headers_size: usize,
            body: ModuleBuffer,
            timeout_milliseconds: u64,
        ) -> u32;
        /// A handle any thread may commit events through; they run on the main thread.
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
            config: ConfigEnvoyPtr,
        ) -> *mut c_void;
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
            scheduler: *mut c_void,
            event_id: u64,
        );
        pub fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
            scheduler: *mut c_void,
        );
    }
}

/// Log to Envoy's `dynamic_modules` logger.
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the message buffer points into `message`, alive for the call; Envoy copies it.
    unsafe {
        raw::envoy_dynamic_module_callback_log(level as u32, ModuleBuffer::of(message.as_bytes()))
    }
}

/// The filter configuration being created (valid inside `config_new` only).
struct ConfigHandle(ConfigEnvoyPtr);

impl ConfigHost for ConfigHandle {
    fn define_counter(&mut self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `self.0` is the config pointer Envoy passed to the running `config_new`;
        // `name` outlives the call (Envoy copies it into its stat name pool); no labels; `id`
        // is a live local Envoy writes once.
        let result = unsafe {
            raw::envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: as for `define_counter`.
        let result = unsafe {
            raw::envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                std::ptr::null(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }
}

/// `envoy_dynamic_module_type_http_callout_init_result`, by value.
fn callout_init_error(result: u32) -> &'static str {
    match result {
        1 => "missing required headers",
        2 => "no such cluster",
        3 => "duplicate callout id",
        4 => "cannot create the request: no healthy host?",
        _ => "unknown callout error",
    }
}

/// A configuration on the main thread (inside `config_scheduled`, `config_http_callout_done`
/// or `config_destroy`): `config` is the pointer Envoy passed to that hook.
struct MainThread(ConfigEnvoyPtr);

impl CollectorHost for MainThread {
    fn http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, &'static str> {
        let headers: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            })
            .collect();
        let mut id = 0u64;
        // SAFETY: `self.0` is the configuration pointer of the running main-thread hook; the
        // cluster name, the header array with each key and value, and the body are alive for
        // the call, and Envoy copies them into its request; `id` is a live local.
        let result = unsafe {
            raw::envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                timeout_ms,
            )
        };
        if result == 0 {
            Ok(id)
        } else {
            Err(callout_init_error(result))
        }
    }

    fn increment(&mut self, counter: usize, value: u64) {
        // SAFETY: the configuration pointer is the running main-thread hook's; `counter` was
        // defined on this configuration; no labels.
        let _ = unsafe {
            raw::envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.0,
                counter,
                std::ptr::null(),
                0,
                value,
            )
        };
    }

    fn move_gauge(&mut self, gauge: usize, delta: i64) {
        let value = delta.unsigned_abs();
        // SAFETY: as for `increment`; `gauge` was defined on this configuration.
        let _ = unsafe {
            if delta >= 0 {
                raw::envoy_dynamic_module_callback_http_filter_config_increment_gauge(
                    self.0,
                    gauge,
                    std::ptr::null(),
                    0,
                    value,
                )
            } else {
                raw::envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
                    self.0,
                    gauge,
                    std::ptr::null(),
                    0,
                    value,
                )
            }
        };
    }
}

/// A configuration's scheduler: events committed through it run `config_scheduled` on the main
/// thread, while the configuration lives (Envoy holds it weakly, so a late commit is dropped).
struct Scheduler(*mut c_void);

// SAFETY: Envoy's config scheduler is made for committing from any thread (it posts to the main
// dispatcher, which is thread-safe), and it is deleted once, by its owner.
unsafe impl Send for Scheduler {}

impl Scheduler {
    fn new(config: ConfigEnvoyPtr) -> Option<Scheduler> {
        // SAFETY: `config` is the pointer Envoy passed to the running `config_new`.
        let ptr =
            unsafe { raw::envoy_dynamic_module_callback_http_filter_config_scheduler_new(config) };
        (!ptr.is_null()).then_some(Scheduler(ptr))
    }

    fn commit(&self, event: u64) {
        // SAFETY: the scheduler is alive (deleted only in `drop`).
        unsafe {
            raw::envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, event)
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `scheduler_new` and is deleted once, here.
        unsafe { raw::envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// A stream's scheduler: a commit runs the stream's `scheduled` hook on its worker.
struct StreamScheduler(*mut c_void);

// SAFETY: Envoy's stream scheduler is made for committing from any thread (it posts to the
// stream's worker dispatcher, and holds the stream weakly); it is deleted once, by its owner.
unsafe impl Send for StreamScheduler {}

impl Wake for StreamScheduler {
    fn wake(&self) {
        // SAFETY: the scheduler is alive (deleted only in `drop`).
        unsafe { raw::envoy_dynamic_module_callback_http_filter_scheduler_commit(self.0, 1) }
    }
}

impl Drop for StreamScheduler {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `scheduler_new` and is deleted once, here.
        unsafe { raw::envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0) }
    }
}

/// The event a tick commits.
const TICK_EVENT: u64 = 1;

/// A thread that wakes the main thread every [`TICK_MS`] until it is stopped (Envoy has no
/// timer for modules; its scheduler runs what is committed as soon as the main thread can).
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(scheduler: Scheduler) -> Option<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let theirs = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tollgate-tick".into())
            .spawn(move || {
                let (stopped, wake) = &*theirs;
                let Ok(mut stopped) = stopped.lock() else {
                    return;
                };
                while !*stopped {
                    match wake.wait_timeout(stopped, Duration::from_millis(TICK_MS)) {
                        Ok((guard, _)) => stopped = guard,
                        Err(_) => return,
                    }
                    if !*stopped {
                        scheduler.commit(TICK_EVENT);
                    }
                }
            })
            .ok()?;
        Some(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    /// Stop and join the thread, so nothing commits after the configuration is gone (the
    /// thread owns the scheduler and deletes it as it ends).
    fn drop(&mut self) {
        let (stopped, wake) = &*self.stop;
        if let Ok(mut stopped) = stopped.lock() {
            *stopped = true;
        }
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What Envoy holds for one configuration: the configuration its streams share, and its
/// ticker (dropped first, so no tick runs on a configuration being destroyed).
struct ConfigBox {
    ticker: Option<Ticker>,
    /// Envoy's side of this configuration, as `config_new` got it. Envoy does not pass it to
    /// `config_destroy`, but calls that hook from the object's destructor, before its members
    /// (stats, callouts) go: still valid there for the last gauge updates.
    envoy: ConfigEnvoyPtr,
    config: Config,
}

/// One stream, for the duration of one hook: `filter` is valid until the hook returns.
struct FilterHandle(FilterEnvoyPtr);

impl Http for FilterHandle {
    fn request_header(&self, name: &str) -> Option<&[u8]> {
        let mut result = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: `self.0` is the stream's filter pointer handed to the running hook; the key
        // is borrowed for the call; `result` is a live local; no value count is asked for.
        let found = unsafe {
            raw::envoy_dynamic_module_callback_http_get_header(
                self.0,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                &mut result,
                0,
                std::ptr::null_mut(),
            )
        };
        if !found || result.ptr.is_null() {
            return None;
        }
        // SAFETY: Envoy points `result` at the header value in its request header map, which
        // stays unchanged while the hook runs and nothing writes headers: the returned slice
        // borrows `self`, and every header write takes `&mut self`.
        Some(unsafe { std::slice::from_raw_parts(result.ptr, result.length) })
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: the filter pointer is the running hook's; key and value are borrowed for the
        // call and copied by Envoy; a null value removes the header.
        let _ = unsafe {
            raw::envoy_dynamic_module_callback_http_set_header(
                self.0,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        };
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        // SAFETY: as for `set_request_header`, on the response headers of the running hook.
        let _ = unsafe {
            raw::envoy_dynamic_module_callback_http_set_header(
                self.0,
                RESPONSE_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
    }

    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        // SAFETY: the filter pointer is the running hook's; the three buffers are borrowed for
        // the call and copied by Envoy into the stream's dynamic metadata.
        unsafe {
            raw::envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                self.0,
                ModuleBuffer::of(namespace.as_bytes()),
                ModuleBuffer::of(key.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        };
    }

    fn received_body_bytes(&self, request: bool) -> u64 {
        let body_type = if request {
            RECEIVED_REQUEST_BODY
        } else {
            RECEIVED_RESPONSE_BODY
        };
        // SAFETY: the filter pointer is the running body hook's; Envoy only reads the buffer's
        // length (0 when there is none).
        let size =
            unsafe { raw::envoy_dynamic_module_callback_http_get_body_size(self.0, body_type) };
        size as u64
    }

    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let headers: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(k, v)| ModuleHttpHeader {
                key_ptr: k.as_ptr(),
                key_length: k.len(),
                value_ptr: v.as_ptr(),
                value_length: v.len(),
            })
            .collect();
        let details = b"tollgate";
        // SAFETY: the filter pointer is the running hook's; the header array, each key and
        // value, the body and the details are alive for the call, and Envoy copies them.
        unsafe {
            raw::envoy_dynamic_module_callback_http_send_response(
                self.0,
                status,
                headers.as_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(details),
            )
        }
    }

    fn waker(&mut self) -> Option<Box<dyn Wake>> {
        // SAFETY: the filter pointer is the running hook's.
        let ptr = unsafe { raw::envoy_dynamic_module_callback_http_filter_scheduler_new(self.0) };
        (!ptr.is_null()).then(|| Box::new(StreamScheduler(ptr)) as Box<dyn Wake>)
    }

    fn client_address(&self) -> Option<String> {
        let mut result = EnvoyBuffer {
            ptr: std::ptr::null(),
            length: 0,
        };
        // SAFETY: the filter pointer is the running hook's; `result` is a live local Envoy
        // points at the attribute's bytes, valid while the hook runs (copied out below).
        let found = unsafe {
            raw::envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.0,
                ATTRIBUTE_SOURCE_ADDRESS,
                &mut result,
            )
        };
        if !found {
            return None;
        }
        // SAFETY: as above.
        let bytes = unsafe { bytes(result.ptr, result.length) };
        std::str::from_utf8(bytes).ok().map(str::to_string)
    }

    fn continue_request(&mut self) {
        // SAFETY: the filter pointer is the running hook's (`scheduled`, on its worker).
        unsafe { raw::envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) }
    }
}

/// Run a hook's body; a panic is logged and becomes `fallback`.
fn guard<T>(hook: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            let message = format!("tollgate: panic caught in {hook}");
            // Even the log must not unwind into Envoy.
            let _ = catch_unwind(|| log(LogLevel::Critical, &message));
            fallback
        }
    }
}

/// What a stream holds: its configuration (Envoy keeps the configuration alive while any of
/// its streams lives) and its own state.
struct StreamBox {
    config: *const Config,
    stream: Stream,
}

/// # Safety (for the callers below)
/// `module_ptr` is what `on_http_filter_new` returned for this stream and not yet destroyed;
/// Envoy calls one stream's hooks from its worker thread, one at a time.
unsafe fn stream_mut<'a>(module_ptr: *mut c_void) -> Option<(&'a Config, &'a mut Stream)> {
    let boxed = module_ptr.cast::<StreamBox>();
    // SAFETY: per this function's contract, `boxed` is null or a live, unaliased StreamBox.
    let boxed = unsafe { boxed.as_mut() }?;
    // SAFETY: the configuration outlives its streams (Envoy holds it for each of them).
    let config = unsafe { boxed.config.as_ref() }?;
    Some((config, &mut boxed.stream))
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy_ptr: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard("config_new", std::ptr::null(), || {
        let bytes = if config.ptr.is_null() {
            &[][..]
        } else {
            // SAFETY: Envoy lends the configuration bytes for the duration of this hook; they
            // are parsed into owned values before it returns.
            unsafe { std::slice::from_raw_parts(config.ptr, config.length) }
        };
        let name = if name.ptr.is_null() {
            &[][..]
        } else {
            // SAFETY: as for the configuration bytes.
            unsafe { std::slice::from_raw_parts(name.ptr, name.length) }
        };
        let Some(config) = Config::new(&mut ConfigHandle(config_envoy_ptr), name, bytes) else {
            return std::ptr::null();
        };
        // Stats, usage shipping, syncs and key fetches all run on the main thread's tick.
        let ticker = Scheduler::new(config_envoy_ptr).and_then(Ticker::start);
        if ticker.is_none() {
            crate::log(
                LogLevel::Critical,
                "tollgate: cannot start the main thread's ticker (scheduler or thread refused)",
            );
            return std::ptr::null();
        }
        let boxed = ConfigBox {
            ticker,
            envoy: config_envoy_ptr,
            config,
        };
        Box::into_raw(Box::new(boxed)).cast_const().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    config_module_ptr: *mut c_void,
) {
    guard("config_destroy", (), || {
        if config_module_ptr.is_null() {
            return;
        }
        // SAFETY: the pointer is the Box `config_new` leaked; Envoy destroys it once, after
        // its last stream.
        let mut boxed = unsafe { Box::from_raw(config_module_ptr.cast::<ConfigBox>()) };
        // No tick may run while (or after) the configuration closes.
        drop(boxed.ticker.take());
        boxed.config.close(&mut MainThread(boxed.envoy));
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    config_envoy_ptr: ConfigEnvoyPtr,
    config_module_ptr: *mut c_void,
    _event_id: u64,
) {
    guard("config_scheduled", (), || {
        // SAFETY: Envoy passes the pointer `config_new` returned, alive until `config_destroy`
        // (which runs on this same main thread, so not during this hook).
        let Some(boxed) = (unsafe { config_module_ptr.cast::<ConfigBox>().as_ref() }) else {
            return;
        };
        boxed.config.tick(&mut MainThread(config_envoy_ptr));
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    config_envoy_ptr: ConfigEnvoyPtr,
    config_module_ptr: *mut c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    guard("config_http_callout_done", (), || {
        // SAFETY: as in `config_scheduled`.
        let Some(boxed) = (unsafe { config_module_ptr.cast::<ConfigBox>().as_ref() }) else {
            return;
        };
        // SAFETY: Envoy lends the headers and body chunks (arrays of the given sizes, or null
        // when the callout failed) until this hook returns; they are copied out before that.
        let answer =
            unsafe { read_answer(result, headers, headers_size, body_chunks, body_chunks_size) };
        let answer = answer.as_ref().map(|(status, body)| CalloutAnswer {
            status: status.as_slice(),
            body: body.as_slice(),
        });
        boxed
            .config
            .callout_done(&mut MainThread(config_envoy_ptr), callout_id, answer);
    })
}

/// The `:status` and the body of an answered callout (`None` if it failed, or its body is
/// larger than any answer the collector gives).
///
/// # Safety
/// `headers` and `body_chunks` are null or point to arrays of `headers_size` and
/// `body_chunks_size` entries whose buffers are alive for the call.
unsafe fn read_answer(
    result: u32,
    headers: *const EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) -> Option<(Vec<u8>, Vec<u8>)> {
    const CALLOUT_SUCCESS: u32 = 0;
    if result != CALLOUT_SUCCESS || headers.is_null() {
        return None;
    }
    // SAFETY: per this function's contract.
    let headers = unsafe { std::slice::from_raw_parts(headers, headers_size) };
    let status = headers.iter().find_map(|h| {
        // SAFETY: each header's key and value point into Envoy's response header map.
        let key = unsafe { bytes(h.key_ptr, h.key_length) };
        // SAFETY: as for the key.
        (key == b":status").then(|| unsafe { bytes(h.value_ptr, h.value_length) }.to_vec())
    })?;
    let mut body = Vec::new();
    if !body_chunks.is_null() {
        // SAFETY: per this function's contract.
        let chunks = unsafe { std::slice::from_raw_parts(body_chunks, body_chunks_size) };
        for chunk in chunks {
            if body.len().saturating_add(chunk.length) > tollgate_core::calls::MAX_SYNC_ANSWER_BYTES
            {
                return None;
            }
            // SAFETY: each chunk points into Envoy's response body.
            body.extend_from_slice(unsafe { bytes(chunk.ptr, chunk.length) });
        }
    }
    Some((status, body))
}

/// # Safety
/// `ptr` is null or points to `length` bytes alive for the caller's use.
unsafe fn bytes<'a>(ptr: *const u8, length: usize) -> &'a [u8] {
    if ptr.is_null() {
        return &[];
    }
    // SAFETY: per this function's contract.
    unsafe { std::slice::from_raw_parts(ptr, length) }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config_module_ptr: *mut c_void,
    _filter_envoy_ptr: FilterEnvoyPtr,
) -> *const c_void {
    guard("filter_new", std::ptr::null(), || {
        // SAFETY: Envoy passes the pointer `config_new` returned; it outlives this stream.
        let Some(config) = (unsafe { config_module_ptr.cast::<ConfigBox>().as_ref() }) else {
            return std::ptr::null();
        };
        let boxed = Box::new(StreamBox {
            config: &config.config,
            stream: Stream::default(),
        });
        Box::into_raw(boxed).cast_const().cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    let answered = guard("request_headers", None, || {
        // SAFETY: Envoy passes the pointer `on_http_filter_new` returned for this stream.
        let (config, stream) = unsafe { stream_mut(filter_module_ptr) }?;
        Some(stream.request_headers(config, &mut FilterHandle(filter_envoy_ptr)))
    });
    match answered {
        Some(true) => HEADERS_CONTINUE,
        Some(false) => HEADERS_STOP_ITERATION,
        // A panic (or no stream state): the request was neither checked nor metered.
        None => {
            let _ = catch_unwind(|| crate::internal_error(&mut FilterHandle(filter_envoy_ptr)));
            HEADERS_STOP_ITERATION
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    let holding = guard("request_body", false, || {
        // SAFETY: as in `request_headers`.
        let Some((_, stream)) = (unsafe { stream_mut(filter_module_ptr) }) else {
            return false;
        };
        stream.request_body(&FilterHandle(filter_envoy_ptr));
        stream.holding()
    });
    // Held for a lease or a seat: Envoy buffers the body until the decision (a Continue
    // here would send the headers on too).
    if holding {
        STOP_ITERATION_AND_BUFFER
    } else {
        CONTINUE
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
) -> u32 {
    let holding = guard("request_trailers", false, || {
        // SAFETY: as in `request_headers`.
        unsafe { stream_mut(filter_module_ptr) }.is_some_and(|(_, stream)| stream.holding())
    });
    if holding {
        TRAILERS_STOP_ITERATION
    } else {
        CONTINUE
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    guard("response_headers", (), || {
        // SAFETY: as in `request_headers`.
        if let Some((_, stream)) = unsafe { stream_mut(filter_module_ptr) } {
            stream.response_headers(&mut FilterHandle(filter_envoy_ptr));
        }
    });
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
    _end_of_stream: bool,
) -> u32 {
    guard("response_body", (), || {
        // SAFETY: as in `request_headers`.
        if let Some((_, stream)) = unsafe { stream_mut(filter_module_ptr) } {
            stream.response_body(&FilterHandle(filter_envoy_ptr));
        }
    });
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy_ptr: FilterEnvoyPtr,
    _filter_module_ptr: *mut c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
) {
    guard("stream_complete", (), || {
        // SAFETY: as in `request_headers`.
        if let Some((config, stream)) = unsafe { stream_mut(filter_module_ptr) } {
            stream.complete(config);
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module_ptr: *mut c_void) {
    guard("filter_destroy", (), || {
        if !filter_module_ptr.is_null() {
            // SAFETY: the pointer is the Box `filter_new` leaked; Envoy destroys it once.
            drop(unsafe { Box::from_raw(filter_module_ptr.cast::<StreamBox>()) });
        }
    })
}

// Hooks Envoy 1.40 requires to load a module, for features this module does not use
// (stream-level HTTP callouts and streams, watermarks). The C ABI lets a callee ignore its
// arguments, so they take none; each does nothing, so there is nothing to panic.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset() {}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: *mut c_void,
    _event_id: u64,
) {
    let resumed = guard("scheduled", false, || {
        // SAFETY: as in `request_headers` (Envoy runs it on the stream's worker). The borrow
        // ends before the answer: answering may run `stream_complete` on this same stream.
        let resumed = match unsafe { stream_mut(filter_module_ptr) } {
            Some((config, stream)) => stream.resume(config),
            None => return false,
        };
        if let Some(resumed) = resumed {
            resumed.answer(&mut FilterHandle(filter_envoy_ptr));
        }
        true
    });
    if !resumed {
        // The held request can be neither decided nor let go: answer it.
        let _ = catch_unwind(|| crate::internal_error(&mut FilterHandle(filter_envoy_ptr)));
    }
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark()
{
}
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark()
{
}

/// Unit tests link without Envoy: stand-ins for the callbacks the safe wrappers call.
#[cfg(test)]
#[allow(clippy::missing_safety_doc)]
mod raw {
    use std::ffi::c_void;

    use super::{ConfigEnvoyPtr, EnvoyBuffer, FilterEnvoyPtr, ModuleBuffer, ModuleHttpHeader};

    pub unsafe fn envoy_dynamic_module_callback_log(_level: u32, _message: ModuleBuffer) {}
    pub unsafe fn envoy_dynamic_module_callback_http_get_header(
        _: FilterEnvoyPtr,
        _: u32,
        _: ModuleBuffer,
        _: *mut EnvoyBuffer,
        _: usize,
        _: *mut usize,
    ) -> bool {
        false
    }
    pub unsafe fn envoy_dynamic_module_callback_http_set_header(
        _: FilterEnvoyPtr,
        _: u32,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) -> bool {
        false
    }
    pub unsafe fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        _: FilterEnvoyPtr,
        _: ModuleBuffer,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) {
    }
    pub unsafe fn envoy_dynamic_module_callback_http_get_body_size(
        _: FilterEnvoyPtr,
        _: u32,
    ) -> usize {
        0
    }
    pub unsafe fn envoy_dynamic_module_callback_http_send_response(
        _: FilterEnvoyPtr,
        _: u32,
        _: *const ModuleHttpHeader,
        _: usize,
        _: ModuleBuffer,
        _: ModuleBuffer,
    ) {
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        _: ConfigEnvoyPtr,
        _: ModuleBuffer,
        _: *const ModuleBuffer,
        _: usize,
        _: *mut usize,
    ) -> u32 {
        1
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        _: FilterEnvoyPtr,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        _: *mut c_void,
        _: u64,
    ) {
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_scheduler_delete(_: *mut c_void) {}
    pub unsafe fn envoy_dynamic_module_callback_http_filter_continue_decoding(_: FilterEnvoyPtr) {}
    pub unsafe fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        _: FilterEnvoyPtr,
        _: u32,
        _: *mut EnvoyBuffer,
    ) -> bool {
        false
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        _: ConfigEnvoyPtr,
        _: ModuleBuffer,
        _: *const ModuleBuffer,
        _: usize,
        _: *mut usize,
    ) -> u32 {
        1
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        _: ConfigEnvoyPtr,
        _: usize,
        _: *const ModuleBuffer,
        _: usize,
        _: u64,
    ) -> u32 {
        1
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_increment_gauge(
        _: ConfigEnvoyPtr,
        _: usize,
        _: *const ModuleBuffer,
        _: usize,
        _: u64,
    ) -> u32 {
        1
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_decrement_gauge(
        _: ConfigEnvoyPtr,
        _: usize,
        _: *const ModuleBuffer,
        _: usize,
        _: u64,
    ) -> u32 {
        1
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        _: ConfigEnvoyPtr,
        _: *mut u64,
        _: ModuleBuffer,
        _: *const ModuleHttpHeader,
        _: usize,
        _: ModuleBuffer,
        _: u64,
    ) -> u32 {
        2
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        _: ConfigEnvoyPtr,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        _: *mut c_void,
        _: u64,
    ) {
    }
    pub unsafe fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        _: *mut c_void,
    ) {
    }
}
