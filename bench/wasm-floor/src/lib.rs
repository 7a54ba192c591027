//! The floor of any proxy-wasm HTTP filter, for `filter-bench`: a filter built with the same
//! SDK, compiler settings and runtime as Tollgate that decides nothing. Its plugin
//! configuration says which host calls to make per request, so the cost of the ABI itself
//! (VM entries per callback, and each kind of host call) can be separated from Tollgate's own
//! work:
//!
//! - `""`: no host call at all; only the callbacks Envoy makes into every wasm HTTP filter;
//! - `"reads=N"`: N request header reads (`:path`, `:method`, `authorization`, ...);
//! - `"clock=N"`: N reads of the proxy's clock;
//! - `"writes=N"`: N request headers replaced (`x-floor-0`, ...);
//! - `"pairs=N"`: N reads of the whole request header map in one call;
//! - `"props=N"`: N property reads (`request.path`).
//!
//! Items are separated by commas, e.g. `"clock=2,reads=3,writes=4"` makes the host calls of
//! Tollgate's warm path.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot::default()) });
}}

/// Host calls per request.
#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    reads: usize,
    clock: usize,
    writes: usize,
    pairs: usize,
    props: usize,
}

#[derive(Default)]
struct FloorRoot {
    calls: Calls,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        )
        .ok()
        .flatten()
        .unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((name, count)) = item.split_once('=') else {
                return false;
            };
            let Ok(count) = count.parse::<usize>() else {
                return false;
            };
            match name {
                "reads" => self.calls.reads = count,
                "clock" => self.calls.clock = count,
                "writes" => self.calls.writes = count,
                "pairs" => self.calls.pairs = count,
                "props" => self.calls.props = count,
                _ => return false,
            }
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(FloorHttp { calls: self.calls }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct FloorHttp {
    calls: Calls,
}

impl Context for FloorHttp {}

const READ: [&str; 4] = [":path", ":method", "authorization", "user-agent"];
const WRITE: [&str; 4] = ["x-floor-0", "x-floor-1", "x-floor-2", "x-floor-3"];

impl HttpContext for FloorHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut seen = 0usize;
        for _ in 0..self.calls.clock {
            if hostcalls::get_current_time().is_ok() {
                seen += 1;
            }
        }
        for name in READ.iter().cycle().take(self.calls.reads) {
            if let Ok(Some(value)) =
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
            {
                seen += value.len();
            }
        }
        for _ in 0..self.calls.pairs {
            if let Ok(pairs) = hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
                seen += pairs.len();
            }
        }
        for _ in 0..self.calls.props {
            if let Ok(Some(value)) = hostcalls::get_property(vec!["request", "path"]) {
                seen += value.len();
            }
        }
        for name in WRITE.iter().cycle().take(self.calls.writes) {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some("floor"));
        }
        // Keeps the reads from being optimised away.
        std::hint::black_box(seen);
        Action::Continue
    }
}
