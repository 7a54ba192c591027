//! The sync with the collector: lease requests, lease returns and the licenses served go out
//! in one signed `POST` (one in flight per VM); grants and denials come back. Requests that
//! wait for a lease are held (paused) and decided again when the answer is in, or on a tick.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use tollgate_core::calls::{sync_answer, sync_request, MAX_SYNC_ANSWER_BYTES};
use tollgate_core::config::CollectorPolicy;
use tollgate_core::gate::SyncWork;
use tollgate_core::Admission;
use tollgate_wire::sync::SyncResponse;

use crate::log;

/// A request held until its quota has a lease: the root decides it and resumes it.
pub struct Waiter {
    pub context_id: u32,
    pub since_ms: u64,
    pub slot: Rc<RefCell<WaitSlot>>,
}

/// What a held request and the root share.
#[derive(Default)]
pub struct WaitSlot {
    pub admission: Option<Admission>,
    /// The stream ended (the client left) before it was decided.
    pub gone: bool,
    /// When the root decided it (Unix ms): processing time is metered from then, so the
    /// wait for a lease is not billed as processing.
    pub decided_ms: u64,
}

/// Requests held on this worker.
pub type Waiters = Rc<RefCell<Vec<Waiter>>>;

/// The sync in flight.
pub struct SyncCall {
    pub token: u32,
    pub work: SyncWork,
    pub sent_ms: u64,
}

/// Send `work` to the collector; the call's token, or `None` if it could not be sent.
pub fn dispatch(settings: &CollectorPolicy, instance: &str, work: &SyncWork) -> Option<u32> {
    let call = sync_request(settings, instance, work);
    match hostcalls::dispatch_http_call(
        &settings.cluster,
        call.headers(settings, &settings.sync_path).to_vec(),
        Some(&call.body),
        Vec::new(),
        Duration::from_millis(settings.timeout_ms),
    ) {
        Ok(token) => Some(token),
        Err(status) => {
            log(
                LogLevel::Warn,
                &format!("cannot sync with the collector ({status:?}); quotas wait for leases"),
            );
            None
        }
    }
}

/// The collector's answer to a sync, if it is one (`num_headers` 0: the call failed).
pub fn read_answer(num_headers: usize, body_size: usize) -> Option<SyncResponse> {
    if num_headers == 0 || body_size == 0 || body_size > MAX_SYNC_ANSWER_BYTES {
        return None;
    }
    // Bytes getters only: the SDK's String getters unwrap UTF-8 and would panic.
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()?;
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()?;
    sync_answer(&status, &body)
}
