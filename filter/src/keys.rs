//! Fetching the license keys from a JWKS endpoint (`token.jwks_source`): the core decides
//! when and keeps the set; this sends the `GET` through the Envoy cluster and reads the answer.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use tollgate_core::config::JwksSource;
use tollgate_core::jwks::Fetched;

use crate::{log, SharedGate};

/// A JWKS is a few keys; an answer larger than this is not one.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Start a fetch if one is due; the call's token.
pub fn tick(gate: &SharedGate, now_ms: u64) -> Option<u32> {
    let mut gate = gate.try_borrow_mut().ok()?;
    let source: JwksSource = gate.jwks_due(now_ms)?;
    let headers = vec![
        (":method", "GET"),
        (":path", source.path.as_str()),
        (":authority", source.authority.as_str()),
        ("accept", "application/jwk-set+json, application/json"),
    ];
    match hostcalls::dispatch_http_call(
        &source.cluster,
        headers,
        None,
        Vec::new(),
        Duration::from_millis(source.timeout_ms),
    ) {
        Ok(token) => {
            gate.jwks_started(true, now_ms);
            Some(token)
        }
        Err(status) => {
            log(
                LogLevel::Warn,
                &format!(
                    "cannot fetch the license keys from cluster {} ({status:?})",
                    source.cluster
                ),
            );
            gate.jwks_started(false, now_ms);
            None
        }
    }
}

/// The fetch answered (`num_headers` 0: it failed).
pub fn answered(gate: &SharedGate, num_headers: usize, body_size: usize, now_ms: u64) {
    let answer = if num_headers == 0 {
        None
    } else {
        // Bytes getters only: the SDK's String getters unwrap UTF-8 and would panic.
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        let body = if body_size == 0 || body_size > MAX_JWKS_BYTES {
            Vec::new()
        } else {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        Some((status, body))
    };
    let Ok(mut gate) = gate.try_borrow_mut() else {
        return;
    };
    let fetched = gate.jwks_answered(
        answer
            .as_ref()
            .map(|(status, body)| (*status, body.as_slice())),
        now_ms,
    );
    match fetched {
        Some(Fetched::Changed { keys, skipped }) => {
            let mut message = format!("license keys updated: {keys} key(s) from the JWKS");
            if !skipped.is_empty() {
                message.push_str(&format!("; skipped: {}", skipped.join("; ")));
            }
            log(LogLevel::Info, &message);
        }
        Some(Fetched::Failed(why)) => log(
            LogLevel::Warn,
            &format!("fetching the license keys failed ({why}); the last good keys stay in use"),
        ),
        Some(Fetched::Unchanged) | None => {}
    }
}
