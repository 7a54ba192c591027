//! Every decoder of the wire crate that takes bytes from the network: the usage batch and
//! the sync request (collector side), the sync response, the batch acknowledgement and the
//! refusal (filter side). What decodes must encode and decode again to an equal value, and
//! still pass the decoder's checks. A decoded sync response is also taken by a gate that
//! waits for it, as the filter takes the collector's answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_fuzz_common::{layout, sync_flow};
use tollgate_wire::sync::{SyncRequest, SyncResponse};
use tollgate_wire::{BatchAck, Refusal, UsageBatch};

/// `decode`, and if it succeeds, `encode` then `decode` gives the same value.
macro_rules! round_trip {
    ($ty:ty, $body:expr) => {
        if let Ok(value) = <$ty>::decode($body) {
            let again = <$ty>::decode(&value.encode());
            assert_eq!(again.as_ref(), Ok(&value), "{} round trip", stringify!($ty));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % layout::WIRE_MODES {
        layout::WIRE_BATCH => round_trip!(UsageBatch, body),
        layout::WIRE_SYNC_REQUEST => round_trip!(SyncRequest, body),
        layout::WIRE_SYNC_RESPONSE => round_trip!(SyncResponse, body),
        layout::WIRE_ACK => round_trip!(BatchAck, body),
        layout::WIRE_SYNC_RESPONSE_APPLIED => {
            if let Ok(response) = SyncResponse::decode(body) {
                let (gate, held, work) = sync_flow::prepare();
                sync_flow::answer(gate, held, &work, &response);
            }
        }
        _ => {
            if let Some(refusal) = Refusal::decode(body) {
                assert_eq!(Refusal::decode(&refusal.encode()), Some(refusal.clone()));
                let _ = refusal.is_permanent();
            }
        }
    }
});
