//! Tollgate's proxy-wasm adapter: turns Envoy's callbacks into calls to the core's [`Gate`].
//!
//! Everything that decides lives in `tollgate-core`; this file only reads headers, reads the
//! clock, answers refusals, and folds counters into Envoy stats. It never panics on input:
//! header values are read as bytes (the SDK's `String` getters unwrap UTF-8 and would take
//! down the VM on a non-UTF-8 header).

// Slicing that can panic would take down the VM of every request on a worker.
#![deny(clippy::indexing_slicing)]

mod host;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use tollgate_core::{Admission, Gate, Policy, RequestHead, UsageTotals, Verdict};

use crate::host::{Metrics, SharedDataCells};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TollgateRoot::default()) });
}}

type SharedGate = Rc<RefCell<Gate<SharedDataCells>>>;

/// One per VM: holds the compiled policy and this worker's gate.
#[derive(Default)]
struct TollgateRoot {
    gate: Option<SharedGate>,
    metrics: Option<Rc<Metrics>>,
}

fn log(level: LogLevel, message: &str) {
    // Logging is best effort: a failing log call must not become a failing request.
    let _ = hostcalls::log(level, message);
}

/// The proxy's clock in Unix nanoseconds (0 if the host cannot tell, which never happens in
/// Envoy; tokens then look not yet valid rather than valid forever).
fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Context for TollgateRoot {
    fn on_done(&mut self) -> bool {
        self.flush_stats();
        true
    }
}

impl TollgateRoot {
    fn flush_stats(&self) {
        if let (Some(gate), Some(metrics)) = (&self.gate, &self.metrics) {
            if let Ok(mut gate) = gate.try_borrow_mut() {
                metrics.flush(&mut gate);
            }
        }
    }
}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(bytes)) => bytes,
            Ok(None) | Err(_) => {
                log(
                    LogLevel::Critical,
                    "invalid configuration: the plugin configuration is empty",
                );
                return false;
            }
        };
        let policy = match Policy::from_json(&config) {
            Ok(policy) => Arc::new(policy),
            Err(e) => {
                log(LogLevel::Critical, &e.to_string());
                return false;
            }
        };
        let metrics = match Metrics::define(&policy) {
            Ok(metrics) => Rc::new(metrics),
            Err(problem) => {
                log(
                    LogLevel::Critical,
                    &format!("cannot define stats: {problem}"),
                );
                return false;
            }
        };
        let interval = Duration::from_millis(policy.stats_flush_interval_ms);
        // Counters of an earlier configuration of this VM go out before it is replaced.
        self.flush_stats();
        self.gate = Some(Rc::new(RefCell::new(Gate::new(policy, SharedDataCells))));
        self.metrics = Some(metrics);
        let _ = hostcalls::set_tick_period(interval);
        true
    }

    fn on_tick(&mut self) {
        self.flush_stats();
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(TollgateHttp {
            gate: self.gate.clone(),
            admission: None,
            started_nanos: 0,
            request_bytes: 0,
            response_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per request.
struct TollgateHttp {
    gate: Option<SharedGate>,
    admission: Option<Admission>,
    started_nanos: u64,
    request_bytes: u64,
    response_bytes: u64,
}

impl Context for TollgateHttp {}

fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// Forward with the license headers, strip forged ones, or send the refusal.
fn answer(admission: &Admission, policy: &Policy) {
    match &admission.verdict {
        Verdict::Allow => {
            // Replacing a header also removes every copy the client sent.
            for (name, value) in admission.upstream_headers(policy) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
            }
        }
        Verdict::Public => {
            for name in policy.upstream_headers.names() {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
            }
        }
        Verdict::Refuse(refusal) => {
            let headers = refusal.headers();
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = refusal.body();
            let status = u32::from(refusal.status());
            if hostcalls::send_http_response(status, headers, Some(body.as_bytes())).is_err() {
                log(LogLevel::Error, "could not send a refusal");
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.started_nanos = now_nanos();
        let Some(gate) = self.gate.clone() else {
            // The VM has no valid configuration; Envoy normally refuses to start so. Fail closed.
            let body = br#"{"error":"not_configured","message":"the licensing filter has no valid configuration"}"#;
            let _ = hostcalls::send_http_response(
                503,
                vec![("content-type", "application/json")],
                Some(body),
            );
            return Action::Pause;
        };
        let (admission, policy) = {
            // try_borrow: a re-entrant callback must get an error path, never a panic.
            let Ok(mut gate) = gate.try_borrow_mut() else {
                log(LogLevel::Error, "gate busy in on_http_request_headers");
                return Action::Continue;
            };
            let path = request_header(":path").unwrap_or_default();
            let method = request_header(":method").unwrap_or_default();
            let credential = request_header(&gate.policy().token.header);
            // Bytes that are not UTF-8 cannot be a JWT or a configured path.
            let credential = credential
                .as_deref()
                .map(|c| std::str::from_utf8(c).unwrap_or("\u{fffd}"));
            let head = RequestHead {
                method: std::str::from_utf8(&method).unwrap_or(""),
                path: std::str::from_utf8(&path).unwrap_or(""),
                credential,
            };
            (
                gate.admit(&head, self.started_nanos),
                Arc::clone(gate.policy()),
            )
        };
        answer(&admission, &policy);
        let action = match admission.verdict {
            Verdict::Refuse(_) => Action::Pause,
            Verdict::Allow | Verdict::Public => Action::Continue,
        };
        self.admission = Some(admission);
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.request_bytes = self.request_bytes.saturating_add(body_size as u64);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_bytes = self.response_bytes.saturating_add(body_size as u64);
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(gate), Some(admission)) = (&self.gate, &self.admission) else {
            return;
        };
        let usage = UsageTotals {
            calls: 1,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            processing_nanos: now_nanos().saturating_sub(self.started_nanos),
        };
        match gate.try_borrow_mut() {
            Ok(mut gate) => gate.record(admission, usage),
            Err(_) => log(
                LogLevel::Error,
                "gate busy in on_log; usage of one request not metered",
            ),
        }
    }
}
