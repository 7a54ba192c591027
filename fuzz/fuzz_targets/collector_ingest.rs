//! The collector's ingest path through its real router (`tollgate_collector::app`): the input
//! is a `POST /v1/usage` (or `/v1/sync`) body, signed with the ingest key half the time (so it
//! gets past the HMAC check to the decoder and the SQLite store) and forged otherwise.
//!
//! A response always comes back, and it is never a 5xx other than 503 `store_unavailable`;
//! a correctly signed valid batch is taken (200), an invalid one refused as malformed, an
//! unsigned one as unauthorized.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use libfuzzer_sys::fuzz_target;
use tollgate_collector::{app, AppState, IngestKeys};
use tollgate_fuzz_common::{layout, INGEST_KEY_ID, INGEST_SECRET};
use tollgate_wire::sync::SyncRequest;
use tollgate_wire::{Refusal, UsageBatch, KEY_ID_HEADER, SIGNATURE_HEADER};
use tower::ServiceExt as _;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

/// A fresh SQLite store per process, in memory-backed storage when there is some: the store
/// syncs the WAL on every commit, which on a disk would cap the rate at the disk's.
fn store_dir() -> PathBuf {
    let base = std::env::var_os("TOLLGATE_FUZZ_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("tollgate-fuzz-collector-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("store dir");
    dir
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // One line per stored batch would drown libFuzzer's own output.
        tollgate_collector::telemetry::set_info_logs(false);
        let path = store_dir().join("usage.db");
        let store = tollgate_collector::open(path.to_str().expect("UTF-8 path")).expect("store");
        let keys = IngestKeys::parse([format!("{INGEST_KEY_ID}={INGEST_SECRET}").as_str()])
            .expect("ingest key");
        let state = Arc::new(AppState::new(Arc::from(store), keys));
        // The handler hands the store call to `spawn_blocking`, which a current-thread
        // runtime serves from its blocking pool.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Harness {
            runtime,
            router: app(state),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let harness = harness();
    let sync = mode & layout::INGEST_SYNC != 0;
    let forged = mode & layout::INGEST_FORGED != 0;
    let path = if sync { "/v1/sync" } else { "/v1/usage" };
    let mut request = Request::post(path).header("content-type", "application/json");
    if forged {
        request = match (mode >> 2) % 4 {
            // No signature headers at all.
            0 => request,
            // Signed with another secret.
            1 => request.header(KEY_ID_HEADER, INGEST_KEY_ID).header(
                SIGNATURE_HEADER,
                tollgate_wire::sign(b"not-the-secret-0123", body),
            ),
            // Signed with the right secret under a key id the collector does not know.
            2 => request.header(KEY_ID_HEADER, "unknown").header(
                SIGNATURE_HEADER,
                tollgate_wire::sign(INGEST_SECRET.as_bytes(), body),
            ),
            // A signature header of the body itself (a made-up value of any shape).
            _ => request.header(KEY_ID_HEADER, INGEST_KEY_ID).header(
                SIGNATURE_HEADER,
                String::from_utf8_lossy(&body[..body.len().min(80)])
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .collect::<String>(),
            ),
        };
    } else {
        request = request.header(KEY_ID_HEADER, INGEST_KEY_ID).header(
            SIGNATURE_HEADER,
            tollgate_wire::sign(INGEST_SECRET.as_bytes(), body),
        );
    }
    let request = request.body(Body::from(body.to_vec())).expect("request");

    let (status, answer) = harness.runtime.block_on(async {
        let response = harness
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let answer = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("response body");
        (status, answer)
    });

    let refusal = Refusal::decode(&answer);
    let code = refusal.as_ref().map(|r| r.error.as_str());
    if status.is_server_error() {
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE && code == Some("store_unavailable"),
            "{path}: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        return;
    }
    // A made-up signature may be the right one only by chance; the fuzzer cannot find an
    // HMAC-SHA256 collision, so every forged request is unauthorized.
    if forged {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: forged, {status}");
        return;
    }
    let valid = if sync {
        SyncRequest::decode(body).is_ok()
    } else {
        UsageBatch::decode(body).is_ok()
    };
    if valid {
        assert_eq!(status, StatusCode::OK, "{path}: valid, {status} {code:?}");
    } else {
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE,
            "{path}: invalid, {status} {code:?}"
        );
    }
});
