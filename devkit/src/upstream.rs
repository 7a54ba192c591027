//! A local upstream API for the demo and the tests: echoes what reached it, so a caller can
//! see the headers Tollgate added, and returns bodies of a requested size for byte metering.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use serde_json::json;

/// A running upstream on 127.0.0.1; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(serde::Deserialize)]
struct Shape {
    /// Answer with a body of this many bytes instead of the echo.
    bytes: Option<usize>,
}

async fn echo(
    State(requests): State<Arc<AtomicU64>>,
    method: Method,
    uri: Uri,
    Query(shape): Query<Shape>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    requests.fetch_add(1, Ordering::Relaxed);
    if let Some(n) = shape.bytes {
        return vec![b'x'; n.min(64 << 20)].into_response();
    }
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        seen.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    axum::Json(json!({
        "method": method.as_str(),
        "path": uri.to_string(),
        "headers": seen,
        "body_bytes": body.len(),
    }))
    .into_response()
}

impl Upstream {
    /// Start on `port` (0: any free port).
    pub fn start(port: u16) -> Result<Upstream> {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", port)).context("binding the upstream")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let counter = Arc::clone(&requests);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the upstream's runtime")?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = axum::Router::new().fallback(echo).with_state(counter);
                // Not a graceful shutdown: a proxy's keep-alive connections would hold it open.
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = rx => {}
                }
            });
            runtime.shutdown_background();
        });
        Ok(Upstream {
            addr,
            requests,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests that reached the upstream.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
