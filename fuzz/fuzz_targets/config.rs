//! The filter's plugin configuration: `Policy::from_json` on the raw bytes Envoy hands the
//! filter (`on_configure`), then what the filter builds from an accepted one: a gate that
//! admits requests, and the usage outbox that seals them into a batch.
#![no_main]

use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tollgate_core::shipper::Shipper;
use tollgate_core::{Gate, MemoryCells, Policy, RequestHead, UsageTotals};
use tollgate_fuzz_common::{self as common, NOW};
use tollgate_wire::{Source, UsageBatch};

/// Tokens signed by the fixture's keys for the plans the seed configurations name.
fn tokens() -> &'static [String] {
    static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let keys = common::keys();
        ["pro", "starter", "basic"]
            .iter()
            .zip([&keys.ed, &keys.es, &keys.rs])
            .map(|(plan, key)| {
                let claims = common::claims(plan, &["search", "design", "reports", "api"]);
                format!("Bearer {}", key.sign(&claims).expect("signing"))
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(policy) = Policy::from_json(data) else {
        return;
    };
    let policy = Arc::new(policy);
    let mut gate = Gate::new(Arc::clone(&policy), Rc::new(MemoryCells::default()));
    let now_nanos = NOW * 1_000_000_000;
    for (i, (method, path)) in [
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/v1/search?q=1"),
        ("POST", "/v1/design/x"),
        ("HEAD", "/v1/reports/2026"),
    ]
    .into_iter()
    .enumerate()
    {
        for token in tokens() {
            let admission = gate.admit(
                &RequestHead {
                    method,
                    path,
                    credential: Some(token),
                    user: Some("user-1"),
                    client_address: Some("192.0.2.1"),
                },
                now_nanos + i as u64,
            );
            let _ = admission.ratelimit_headers();
            let _ = admission.upstream_headers(&policy);
            gate.record(
                &admission,
                UsageTotals {
                    calls: 1,
                    request_bytes: 100,
                    response_bytes: 1000,
                    processing_nanos: 5_000,
                },
            );
        }
    }
    let now_ms = NOW * 1000;
    let _ = gate.sync_work(now_ms);
    if let Some(collector) = &policy.collector {
        let source = Source {
            instance: collector
                .instance
                .clone()
                .unwrap_or_else(|| "fuzz-node".into()),
            vm_started_ms: now_ms,
        };
        let mut shipper = Shipper::new(collector.shipper, source, now_ms);
        let usage = gate.drain_usage();
        let _ = shipper.seal(usage, |feature| policy.feature_name(feature), now_ms + 1000);
        if let Some(outgoing) = shipper.next_send(now_ms + 1000) {
            // What the filter sends, the collector must take: an accepted configuration
            // never makes the filter ship a batch the wire format refuses.
            if let Err(e) = UsageBatch::decode(&outgoing.body) {
                panic!("the filter sealed a batch the collector refuses: {e}");
            }
            shipper.failed(&outgoing.batch_id, now_ms + 1000);
        }
    }
});
