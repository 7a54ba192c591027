//! The collector's HTTP calls as every adapter makes them: signed `POST`s of usage batches and
//! syncs, and how their answers are read. Each adapter only carries the bytes (proxy-wasm's
//! `dispatch_http_call`, a dynamic module's config-level callout).

use tollgate_wire::sync::{SyncRequest, SyncResponse};
use tollgate_wire::{BatchAck, Refusal, KEY_ID_HEADER, SIGNATURE_HEADER, VERSION};

use crate::config::CollectorPolicy;
use crate::gate::SyncWork;

/// An acknowledgement or a refusal is small; a larger body is neither.
pub const MAX_BATCH_ANSWER_BYTES: usize = 64 * 1024;

/// A sync answer is at most a few grants and denials per license; larger is not one.
pub const MAX_SYNC_ANSWER_BYTES: usize = 4 << 20;

/// A signed collector call: the body and the signature over it.
pub struct Signed {
    pub body: Vec<u8>,
    pub signature: String,
}

impl Signed {
    pub fn new(settings: &CollectorPolicy, body: Vec<u8>) -> Signed {
        let signature = tollgate_wire::sign(&settings.secret, &body);
        Signed { body, signature }
    }

    /// The request headers of this call to `path` (`:authority` from the settings).
    pub fn headers<'a>(
        &'a self,
        settings: &'a CollectorPolicy,
        path: &'a str,
    ) -> [(&'a str, &'a str); 6] {
        [
            (":method", "POST"),
            (":path", path),
            (":authority", settings.authority.as_str()),
            ("content-type", "application/json"),
            (KEY_ID_HEADER, settings.key_id.as_str()),
            (SIGNATURE_HEADER, self.signature.as_str()),
        ]
    }
}

/// The sync request carrying `work` from the proxy instance `instance`.
pub fn sync_request(settings: &CollectorPolicy, instance: &str, work: &SyncWork) -> Signed {
    let body = SyncRequest {
        version: VERSION,
        instance: instance.to_string(),
        leases: work.leases.clone(),
        returns: work.returns.clone(),
        licenses: work.licenses.clone(),
        seats: work.seats.clone(),
        clients: work.clients.clone(),
    }
    .encode();
    Signed::new(settings, body)
}

/// What the collector said to a usage batch.
#[derive(Debug)]
pub enum BatchReply {
    Ack(BatchAck),
    Refused(Refusal),
    Nothing,
}

/// Read the `:status` and body of the collector's answer to a batch: an ack (200), one of its
/// refusals (400, 413), or nothing usable (anything else, or a body too large to be either).
pub fn batch_reply(status: &[u8], body: &[u8]) -> BatchReply {
    if body.is_empty() || body.len() > MAX_BATCH_ANSWER_BYTES {
        return BatchReply::Nothing;
    }
    match status {
        b"200" => BatchAck::decode(body).map_or(BatchReply::Nothing, BatchReply::Ack),
        b"400" | b"413" => Refusal::decode(body).map_or(BatchReply::Nothing, BatchReply::Refused),
        _ => BatchReply::Nothing,
    }
}

/// The collector's answer to a sync, if it is one (a 200 with a sync response body).
pub fn sync_answer(status: &[u8], body: &[u8]) -> Option<SyncResponse> {
    if status != b"200" || body.is_empty() || body.len() > MAX_SYNC_ANSWER_BYTES {
        return None;
    }
    SyncResponse::decode(body).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tollgate_wire::AckStatus;

    use super::*;

    #[test]
    fn only_a_200_ack_acknowledges_and_only_400_or_413_refuse() {
        let ack = BatchAck {
            version: VERSION,
            batch_id: "i/1/0".into(),
            status: AckStatus::Accepted,
            records: 3,
        }
        .encode();
        match batch_reply(b"200", &ack) {
            BatchReply::Ack(ack) => assert_eq!(ack.batch_id, "i/1/0"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(batch_reply(b"500", &ack), BatchReply::Nothing));
        assert!(matches!(batch_reply(b"200", b""), BatchReply::Nothing));
        let mut padded = ack.clone();
        padded.resize(MAX_BATCH_ANSWER_BYTES + 1, b' ');
        assert!(matches!(batch_reply(b"200", &padded), BatchReply::Nothing));
        let refusal = Refusal::new(Refusal::MALFORMED_BATCH, "bad").encode();
        assert!(matches!(
            batch_reply(b"400", &refusal),
            BatchReply::Refused(_)
        ));
        assert!(matches!(batch_reply(b"503", &refusal), BatchReply::Nothing));
        assert!(sync_answer(b"503", b"{}").is_none());
    }
}
