//! The `tollgate-collector` command line. It lives in the library so that tests can run the
//! very same program as a child process they may kill (see `tests/src/bin/collector-replica.rs`).

use std::sync::Arc;

use crate::{open, AppState, Granularity, IngestKeys, Metrics, UsageQuery};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Tollgate's collector: takes usage batches from filters exactly once, stores them, and
/// answers usage queries.
#[derive(Parser)]
#[command(name = "tollgate-collector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector's HTTP service (ingest, queries, health, metrics).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        /// Storage: sqlite://<path> (WAL mode; created if missing).
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        /// A key that may sign batches, `id=secret` (at least 16 bytes); repeat to rotate.
        /// Also from TOLLGATE_INGEST_KEYS, comma-separated.
        #[arg(
            long = "ingest-key",
            env = "TOLLGATE_INGEST_KEYS",
            value_delimiter = ',',
            required = true
        )]
        ingest_keys: Vec<String>,
    },
    /// Print stored usage, summed per calendar period (UTC), account, license, feature,
    /// outcome and meter.
    Usage {
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        license: Option<String>,
        #[arg(long)]
        feature: Option<String>,
        /// calls, request_bytes, response_bytes or processing_ns.
        #[arg(long)]
        meter: Option<String>,
        /// `allowed` or a refusal code.
        #[arg(long)]
        outcome: Option<String>,
        /// Calendar bucket.
        #[arg(long, value_enum, default_value = "day")]
        by: Granularity,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parse the process arguments and run the command.
pub fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            database,
            ingest_keys,
        } => {
            let keys = IngestKeys::parse(ingest_keys.iter().map(String::as_str))?;
            let store = open(&database)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
                eprintln!("{}", serde_json::json!({"level": "info", "msg": "collector listening", "addr": listener.local_addr()?.to_string(), "database": database}));
                let state = Arc::new(AppState { store: Arc::from(store), keys, metrics: Metrics::default() });
                crate::serve(listener, state, shutdown_signal()).await?;
                eprintln!("{}", serde_json::json!({"level": "info", "msg": "collector stopped"}));
                Ok(())
            })
        }
        Command::Usage {
            database,
            account,
            license,
            feature,
            meter,
            outcome,
            by,
            json,
        } => {
            let store = open(&database)?;
            let rows = store.usage(&UsageQuery {
                account,
                license,
                feature,
                meter,
                outcome,
                from_ms: None,
                to_ms: None,
                granularity: Some(by),
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"rows": rows}))?
                );
            } else {
                println!(
                    "{:<22} {:<16} {:<18} {:<20} {:<22} {:<15} {:>14}",
                    "period", "account", "license", "feature", "outcome", "meter", "units"
                );
                for r in rows {
                    println!(
                        "{:<22} {:<16} {:<18} {:<20} {:<22} {:<15} {:>14}",
                        r.period, r.account, r.license, r.feature, r.outcome, r.meter, r.units
                    );
                }
            }
            Ok(())
        }
    }
}

/// SIGINT or SIGTERM: stop taking new connections, finish the batches in flight.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
