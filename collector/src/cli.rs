//! The `tollgate-collector` command line. It lives in the library so that tests can run the
//! very same program as a child process they may kill (see `tests/src/bin/collector-replica.rs`).

use std::sync::Arc;

use std::path::PathBuf;

use crate::catalog::CatalogFileWatch;
use crate::control::{account_status, ControlPlane, DEFAULT_LEASE_TTL_MS};
use crate::store::Budget;
use crate::{open, AppState, Granularity, IngestKeys, UsageQuery};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tollgate_wire::sync::Period;

/// Tollgate's collector: takes usage batches from filters exactly once, stores them, and
/// answers usage queries.
#[derive(Parser)]
#[command(name = "tollgate-collector", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PeriodArg {
    Hour,
    Day,
    Month,
}

impl From<PeriodArg> for Period {
    fn from(p: PeriodArg) -> Period {
        match p {
            PeriodArg::Hour => Period::Hour,
            PeriodArg::Day => Period::Day,
            PeriodArg::Month => Period::Month,
        }
    }
}

fn now() -> u64 {
    u64::try_from(crate::store::now_ms()).unwrap_or(0)
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
        /// The plan catalogue (JSON: time zone, currency, prices per plan), read again when it
        /// changes. Without it: UTC, no prices.
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: Option<PathBuf>,
        /// Bearer token of the admin API (/v1/admin/...); without it the admin API is off.
        #[arg(long, env = "TOLLGATE_ADMIN_TOKEN")]
        admin_token: Option<String>,
        /// How long a quota lease lasts before the filter must come back.
        #[arg(long, default_value_t = DEFAULT_LEASE_TTL_MS)]
        lease_ttl_ms: u64,
    },
    /// Revoke a license (filters refuse it with 403 license_revoked from their next sync), or
    /// lift the revocation with --undo.
    Revoke {
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        #[arg(long)]
        license: String,
        #[arg(long, default_value = "revoked by an operator")]
        reason: String,
        #[arg(long)]
        undo: bool,
    },
    /// Suspend an account (403 account_suspended from the filters' next sync), or resume it
    /// with --undo.
    Suspend {
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "suspended by an operator")]
        reason: String,
        #[arg(long)]
        undo: bool,
    },
    /// Set an account's spend cap per calendar period (402 spend_cap_reached once its priced
    /// usage reaches it), or remove it with --remove.
    Budget {
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        #[arg(long)]
        account: String,
        /// A decimal amount in the catalogue's currency, e.g. 100.00.
        #[arg(long, required_unless_present = "remove")]
        amount: Option<rust_decimal::Decimal>,
        #[arg(long, value_enum, default_value = "month")]
        period: PeriodArg,
        #[arg(long)]
        remove: bool,
    },
    /// Show an account: suspended or not, budget, spend in the current period.
    Account {
        #[arg(
            long,
            env = "TOLLGATE_DATABASE",
            default_value = "sqlite://tollgate.db"
        )]
        database: String,
        #[arg(long)]
        account: String,
        /// The plan catalogue, for prices and the time zone.
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: Option<PathBuf>,
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
            plans,
            admin_token,
            lease_ttl_ms,
        } => {
            let keys = IngestKeys::parse(ingest_keys.iter().map(String::as_str))?;
            let store = open(&database)?;
            let control = ControlPlane {
                catalog: CatalogFileWatch::open(plans.as_deref())?,
                lease_ttl_ms: lease_ttl_ms.max(1),
            };
            if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
                anyhow::bail!("--admin-token needs at least 16 characters");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
                eprintln!("{}", serde_json::json!({"level": "info", "msg": "collector listening", "addr": listener.local_addr()?.to_string(), "database": database}));
                let mut state = AppState::new(Arc::from(store), keys);
                state.control = control;
                state.admin_token = admin_token;
                let state = Arc::new(state);
                crate::serve(listener, state, shutdown_signal()).await?;
                eprintln!("{}", serde_json::json!({"level": "info", "msg": "collector stopped"}));
                Ok(())
            })
        }
        Command::Revoke {
            database,
            license,
            reason,
            undo,
        } => {
            let store = open(&database)?;
            store.set_revoked(&license, (!undo).then_some(reason.as_str()), now())?;
            println!(
                "license {license} {}",
                if undo {
                    "is no longer revoked"
                } else {
                    "revoked"
                }
            );
            Ok(())
        }
        Command::Suspend {
            database,
            account,
            reason,
            undo,
        } => {
            let store = open(&database)?;
            store.set_suspended(&account, (!undo).then_some(reason.as_str()), now())?;
            println!(
                "account {account} {}",
                if undo { "resumed" } else { "suspended" }
            );
            Ok(())
        }
        Command::Budget {
            database,
            account,
            amount,
            period,
            remove,
        } => {
            let store = open(&database)?;
            let budget = match (remove, amount) {
                (true, _) | (false, None) => None,
                (false, Some(amount)) => {
                    if amount.is_sign_negative() {
                        anyhow::bail!("a budget cannot be negative");
                    }
                    Some(Budget {
                        period: period.into(),
                        amount,
                    })
                }
            };
            store.set_budget(&account, budget.as_ref(), now())?;
            match budget {
                Some(b) => println!(
                    "account {account}: budget {} per {}",
                    b.amount,
                    b.period.as_str()
                ),
                None => println!("account {account}: no budget"),
            }
            Ok(())
        }
        Command::Account {
            database,
            account,
            plans,
        } => {
            let store = open(&database)?;
            let control = ControlPlane {
                catalog: CatalogFileWatch::open(plans.as_deref())?,
                lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            };
            let status = account_status(store.as_ref(), &control, &account, now())?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
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
