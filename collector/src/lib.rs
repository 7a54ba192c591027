//! Tollgate's collector: takes signed usage batches from filters exactly once, stores them
//! (SQLite embedded by default), and answers usage queries.

pub mod admin;
pub mod billing;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod customer;
pub mod exports;
pub mod licensing;
pub mod postgres_store;
pub mod privacy;
pub mod seats;
pub mod server;
pub mod signing;
pub mod store;
pub mod webhooks;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

pub use server::{app, AppState, IngestKeys, Metrics};
pub use store::{open, Granularity, Ingested, Store, UsageQuery, UsageRow};

/// Serve on `listener` until `shutdown` resolves; requests in flight are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let worker = tokio::spawn(worker::run(Arc::clone(&state)));
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving");
    worker.abort();
    served
}

/// A collector running on its own runtime in a background thread, for tests and the demo;
/// stops (gracefully) when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Start on 127.0.0.1:`port` (0: any free port) with `store` and `keys`.
    pub fn start(port: u16, store: Box<dyn Store>, keys: IngestKeys) -> Result<Running> {
        Running::start_state(port, AppState::new(Arc::from(store), keys))
    }

    /// Start on 127.0.0.1:`port` with a prepared state (control plane, admin token).
    pub fn start_state(port: u16, state: AppState) -> Result<Running> {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", port)).context("binding the collector")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let serving = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = serve(listener, serving, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Ok(Running {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
