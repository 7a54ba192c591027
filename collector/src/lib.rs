//! Tollgate's collector: takes signed usage batches from filters exactly once, stores them
//! (SQLite embedded by default), and answers usage queries.

// The layers, each importing only from those below it (no circles; see the README's
// "Repository"): `cli` and `http`, `worker` -> `state` -> the domain modules -> `storage`.
// `clock`, `errors` and `telemetry` are leaves anyone may use.
pub mod account_tokens;
pub mod billing;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod control;
pub mod errors;
pub mod exports;
pub mod group_commit;
pub mod health;
pub mod http;
pub mod licensing;
pub mod overview;
pub mod privacy;
pub mod seats;
pub mod signing;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

pub use http::app;
pub use state::{AppState, IngestKeys};
pub use storage::{open, Granularity, Ingested, Store, UsageQuery, UsageRow};
pub use telemetry::metrics::Metrics;

/// Serve on `listener` until `shutdown` resolves; requests in flight are finished first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_started(listener, state, shutdown, None).await
}

/// [`serve`], telling `started` once the store has been checked and requests are taken.
async fn serve_started(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    started: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<()> {
    telemetry::init_logs();
    let probing = Arc::clone(&state);
    let prober = tokio::task::spawn_blocking(move || {
        health::Prober::start(probing.store.as_ref(), Arc::clone(&probing.readiness))
    })
    .await
    .context("starting the readiness probe")?
    .context("starting the readiness probe")?;
    let worker = tokio::spawn(worker::run(Arc::clone(&state)));
    if let Some(started) = started {
        let _ = started.send(());
    }
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving");
    worker.abort();
    drop(prober);
    served
}

/// A collector running on its own runtime in a background thread, for tests and the demo;
/// stops (gracefully) when dropped, or with [`Running::stop`], which returns how serving ended.
pub struct Running {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Start on 127.0.0.1:`port` (0: any free port) with `store` and `keys`.
    pub fn start(port: u16, store: Box<dyn Store>, keys: IngestKeys) -> Result<Running> {
        Running::start_state(port, AppState::new(Arc::from(store), keys))
    }

    /// Start on 127.0.0.1:`port` with a prepared state (control plane, admin token); returns
    /// once requests are taken, or with the error that kept the collector from serving.
    pub fn start_state(port: u16, state: AppState) -> Result<Running> {
        let listener =
            std::net::TcpListener::bind(("127.0.0.1", port)).context("binding the collector")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(state);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (started, serving_now) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let serving = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .context("taking the collector's listener")?;
                serve_started(
                    listener,
                    serving,
                    async {
                        let _ = stopped.await;
                    },
                    Some(started),
                )
                .await
            })
        });
        let mut running = Running {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        };
        if serving_now.blocking_recv().is_err() {
            // The serving thread ended before it took requests: its error says why.
            return Err(running
                .join()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the collector stopped before serving")));
        }
        Ok(running)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stop gracefully; the error serving ended with, if any.
    pub fn stop(mut self) -> Result<()> {
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(anyhow::anyhow!("the collector's thread panicked")),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            // Not silent: a test that drops a collector that failed sees why in its output
            // (tests that must fail on it call `stop`).
            tracing::error!(error = %format!("{e:#}"), "collector stopped with an error");
        }
    }
}
