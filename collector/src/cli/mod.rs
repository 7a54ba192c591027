//! The `tollgate-collector` command line. It lives in the library so that tests can run the
//! very same program as a child process they may kill (see `tests/src/bin/collector-replica.rs`).

pub mod show;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::CatalogFileWatch;
use crate::control::{account_status, ControlPlane, DEFAULT_LEASE_TTL_MS};
use crate::storage::Budget;
use crate::storage::{open_existing, require_known, Named};
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
    /// Print records as JSON, for machines, instead of tables for people.
    #[arg(long, global = true)]
    json: bool,
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

/// `println!` that returns a closed pipe (`usage | head`) as an error instead of panicking;
/// [`main`] ends quietly on it.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// `print!` likewise.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)?
    }};
}

fn now() -> u64 {
    u64::try_from(crate::storage::now_ms()).unwrap_or(0)
}

/// An account, or an end user's (or client's) pseudonym.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Whose {
    #[arg(long)]
    account: Option<String>,
    /// `<key id>.<32 hex digits>`, see `pseudonym`.
    #[arg(long)]
    subject: Option<String>,
}

fn retention_ms(days: u64, flag: &str) -> Result<u64> {
    if days < crate::privacy::MIN_RETENTION_DAYS {
        anyhow::bail!(
            "--{flag} {days}: at least {} days, so that a billing period is invoiced before its raw usage goes",
            crate::privacy::MIN_RETENTION_DAYS
        );
    }
    Ok(days.saturating_mul(86_400_000))
}

/// Where the store is: every command but `serve` and `init` needs one that exists.
#[derive(clap::Args)]
struct Db {
    /// sqlite://<path> or postgres://user@host/db.
    #[arg(
        long,
        env = "TOLLGATE_DATABASE",
        default_value = "sqlite://tollgate.db",
        global = true
    )]
    database: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector's HTTP service (ingest, queries, health, metrics).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
        /// Storage: sqlite://<path> (WAL mode; created if missing) or postgres://...
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
        /// The `iss` claim of licenses issued here (filters check it with `token.issuers`).
        #[arg(long, env = "TOLLGATE_ISSUER")]
        issuer: Option<String>,
        /// The `aud` claim of licenses issued here (filters check it with `token.audiences`).
        #[arg(long, env = "TOLLGATE_AUDIENCE")]
        audience: Option<String>,
        /// The payment system's webhook URL (invoice finalised, spend thresholds).
        #[arg(long, env = "TOLLGATE_WEBHOOK_URL", requires = "webhook_secret")]
        webhook_url: Option<String>,
        /// The key webhooks are signed with (HMAC-SHA256; at least 16 bytes).
        #[arg(long, env = "TOLLGATE_WEBHOOK_SECRET")]
        webhook_secret: Option<String>,
        /// Finalise each billing period's invoices this long after it ends; 0: only on request.
        #[arg(long, default_value_t = 3600)]
        finalize_grace_seconds: u64,
        /// Roll raw usage older than this many days into hourly aggregates (no end users) and
        /// delete it, every hour; at least 62. Without it raw usage is kept.
        #[arg(long, env = "TOLLGATE_RETAIN_RAW_USAGE_DAYS")]
        retain_raw_usage_days: Option<u64>,
    },
    /// Create the store (or bring its schema up to date) without serving: every other command
    /// but `serve` needs one that exists.
    Init {
        #[command(flatten)]
        db: Db,
    },
    /// License signing keys: list, generate, import, retire.
    Keys {
        #[command(flatten)]
        db: Db,
        /// The plan catalogue, for its time zone (times are shown in UTC without it).
        #[arg(long, env = "TOLLGATE_PLANS", global = true)]
        plans: Option<PathBuf>,
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Licenses: issue, list, show (revoke with `revoke`).
    License {
        #[command(flatten)]
        db: Db,
        /// The plan catalogue: `issue` needs it (the plan must be in it); the others show
        /// times in its time zone (UTC without it).
        #[arg(long, env = "TOLLGATE_PLANS", global = true)]
        plans: Option<PathBuf>,
        #[command(subcommand)]
        action: LicenseAction,
    },
    /// An account's invoice draft for the billing period containing --at (default now).
    Invoice {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        account: String,
        /// The plan catalogue (prices, time zone, billing period): an invoice needs prices.
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: PathBuf,
        /// A time in the period, RFC 3339.
        #[arg(long)]
        at: Option<String>,
        /// CSV lines instead of a table.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Finalise it (the period must have ended); without a webhook URL no event is sent.
        #[arg(long)]
        finalize: bool,
    },
    /// Export stored usage with windows starting in [--from, --to) (RFC 3339), every page.
    Export {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long, value_enum)]
        format: crate::exports::Format,
        /// The plan catalogue (customer ids, Stripe event names).
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: Option<PathBuf>,
    },
    /// Revoke a license (filters refuse it with 403 license_revoked from their next sync), or
    /// lift the revocation with --undo.
    Revoke {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        license: String,
        #[arg(long, default_value = "revoked by an operator")]
        reason: String,
        #[arg(long)]
        undo: bool,
        /// Name a license no filter has served and this collector did not issue.
        #[arg(long)]
        force: bool,
    },
    /// Suspend an account (403 account_suspended from the filters' next sync), or resume it
    /// with --undo.
    Suspend {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        account: String,
        #[arg(long, default_value = "suspended by an operator")]
        reason: String,
        #[arg(long)]
        undo: bool,
        /// Name an account nothing here knows of yet.
        #[arg(long)]
        force: bool,
    },
    /// Set an account's spend cap per calendar period (402 spend_cap_reached once its priced
    /// usage reaches it), or remove it with --remove.
    Budget {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        account: String,
        /// A decimal amount in the catalogue's currency, e.g. 100.00.
        #[arg(long, required_unless_present = "remove")]
        amount: Option<rust_decimal::Decimal>,
        #[arg(long, value_enum, default_value = "month")]
        period: PeriodArg,
        #[arg(long)]
        remove: bool,
        /// Name an account nothing here knows of yet.
        #[arg(long)]
        force: bool,
    },
    /// Show an account: suspended or not, budget, spend in the current period.
    Account {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        account: String,
        /// The plan catalogue, for prices and the time zone.
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: Option<PathBuf>,
    },
    /// Show an account's users: distinct active users this billing period (by license and
    /// feature), seats taken now, and sharing detections. Users are pseudonyms only.
    Users {
        #[command(flatten)]
        db: Db,
        #[arg(long)]
        account: String,
        /// The plan catalogue, for the billing period and time zone.
        #[arg(long, env = "TOLLGATE_PLANS")]
        plans: Option<PathBuf>,
    },
    /// Roll raw usage older than --older-than-days into hourly aggregates and delete it, now
    /// (what `serve --retain-raw-usage-days` does every hour).
    Retention {
        #[command(flatten)]
        db: Db,
        /// At least 62.
        #[arg(long)]
        older_than_days: u64,
    },
    /// Print, as JSON (always: it is the export), everything stored about an account (or one of
    /// its licenses), or about an end user or client pseudonym.
    ExportData {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        whose: Whose,
    },
    /// Erase everything stored about an account (refused while one of its licenses is valid),
    /// or unlink an end-user or client pseudonym from usage and delete its seats and entries.
    Erase {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        whose: Whose,
        /// Required: erasure cannot be undone (export first).
        #[arg(long)]
        yes: bool,
    },
    /// The pseudonym filters send for an end user (or a client address), to find or erase a
    /// person's data: the same key id and secret as the filter's `pseudonyms`.
    Pseudonym {
        #[arg(long)]
        key_id: String,
        #[arg(long, env = "TOLLGATE_PSEUDONYM_SECRET")]
        secret: String,
        /// The end user's id, as the filter reads it (claim or header).
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        user: Option<String>,
        /// A client address, as Envoy's `source.address` gives it.
        #[arg(long)]
        client: Option<String>,
    },
    /// Print stored usage, summed per calendar period (UTC), account, license, feature,
    /// outcome and meter.
    Usage {
        #[command(flatten)]
        db: Db,
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
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Every key: state (pending, active, retired), which one signs.
    List,
    /// Generate a key; it is published at once and signs from --activate-in-seconds on.
    Generate {
        #[arg(long, default_value = "EdDSA")]
        alg: crate::signing::KeyAlg,
        #[arg(long)]
        kid: Option<String>,
        /// Seconds until it signs new licenses: give filters time to fetch it first.
        #[arg(long, default_value_t = 0)]
        activate_in_seconds: u64,
    },
    /// Import a PKCS#8 PEM private key (Ed25519, P-256 or RSA).
    Import {
        #[arg(long)]
        alg: crate::signing::KeyAlg,
        #[arg(long)]
        kid: Option<String>,
        #[arg(long)]
        pem_file: PathBuf,
        #[arg(long, default_value_t = 0)]
        activate_in_seconds: u64,
    },
    /// Retire a key: it leaves the JWKS, and licenses it signed stop verifying.
    Retire {
        #[arg(long)]
        kid: String,
    },
}

#[derive(Subcommand)]
enum LicenseAction {
    /// Issue a license and print its token.
    Issue {
        #[arg(long)]
        account: String,
        #[arg(long)]
        plan: String,
        /// Comma-separated feature names.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Limit overrides, JSON (the filter's `limits` claim).
        #[arg(long)]
        limits: Option<String>,
        #[arg(long)]
        license_id: Option<String>,
        #[arg(long)]
        valid_days: Option<u64>,
        /// The `iss` claim: what filters' `token.issuers` accept (as `serve --issuer`).
        #[arg(long, env = "TOLLGATE_ISSUER")]
        issuer: String,
        /// The `aud` claim: what filters' `token.audiences` accept (as `serve --audience`).
        #[arg(long, env = "TOLLGATE_AUDIENCE")]
        audience: String,
    },
    /// Issued licenses, of one account or all.
    List {
        #[arg(long)]
        account: Option<String>,
    },
    /// One issued license: plan, features, validity, key, revoked or not.
    Show {
        #[arg(long)]
        license: String,
    },
}

fn rfc3339_arg(name: &str, text: &str) -> Result<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("--{name}: `{text}` is not an RFC 3339 time"))?;
    u64::try_from(t.timestamp_millis()).with_context(|| format!("--{name}: before 1970"))
}

/// Parse the process arguments and run the command. A reader that closed the pipe early
/// (`usage | head -3`) ends the command quietly, as other Unix tools do.
pub fn main() -> Result<()> {
    match run() {
        Err(e)
            if e.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            Ok(())
        }
        done => done,
    }
}

/// The time zone times are shown in: the catalogue's, or UTC without one.
fn zone(plans: Option<&Path>) -> Result<chrono_tz::Tz> {
    Ok(CatalogFileWatch::open(plans)?.current().time_zone)
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let json = cli.json;
    match cli.command {
        Command::Serve {
            listen,
            database,
            ingest_keys,
            plans,
            admin_token,
            lease_ttl_ms,
            issuer,
            audience,
            webhook_url,
            webhook_secret,
            finalize_grace_seconds,
            retain_raw_usage_days,
        } => {
            let retention = retain_raw_usage_days
                .map(|days| retention_ms(days, "retain-raw-usage-days"))
                .transpose()?;
            let webhooks = match (webhook_url, webhook_secret) {
                (Some(url), Some(secret)) => {
                    Some(crate::webhooks::WebhookSettings::new(&url, &secret)?)
                }
                _ => None,
            };
            let keys = IngestKeys::parse(ingest_keys.iter().map(String::as_str))?;
            let store = open(&database)?;
            let control = ControlPlane {
                catalog: CatalogFileWatch::open(plans.as_deref())?,
                lease_ttl_ms: lease_ttl_ms.max(1),
                ..ControlPlane::default()
            };
            if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
                anyhow::bail!("--admin-token needs at least 16 characters");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                crate::telemetry::init_logs();
                tracing::info!(addr = %listener.local_addr()?, %database, "collector listening");
                let mut state = AppState::new(Arc::from(store), keys);
                state.control = control;
                state.admin_token = admin_token;
                state.issuer = crate::licensing::Issuer { issuer, audience };
                state.webhooks = webhooks;
                state.billing.finalize_grace_ms = (finalize_grace_seconds > 0)
                    .then(|| finalize_grace_seconds.saturating_mul(1000));
                state.billing.raw_usage_retention_ms = retention;
                let state = Arc::new(state);
                crate::serve(listener, state, shutdown_signal()).await?;
                tracing::info!("collector stopped");
                Ok(())
            })
        }
        Command::Init {
            db: Db { database },
        } => {
            drop(open(&database)?);
            outln!("database ready: {database}");
            Ok(())
        }
        Command::Keys {
            db: Db { database },
            plans,
            action,
        } => {
            let store = open_existing(&database)?;
            let tz = zone(plans.as_deref())?;
            let info = match action {
                KeysAction::List => {
                    let keys = crate::licensing::keys(store.as_ref(), now())?;
                    if json {
                        outln!(
                            "{}",
                            serde_json::to_string_pretty(&serde_json::json!({"keys": keys}))?
                        );
                    } else {
                        out!("{}", show::keys(tz, &keys));
                    }
                    return Ok(());
                }
                KeysAction::Generate {
                    alg,
                    kid,
                    activate_in_seconds,
                } => crate::licensing::add_key(
                    store.as_ref(),
                    alg,
                    kid.as_deref(),
                    None,
                    activate_in_seconds.saturating_mul(1000),
                    now(),
                )?,
                KeysAction::Import {
                    alg,
                    kid,
                    pem_file,
                    activate_in_seconds,
                } => {
                    let pem = std::fs::read_to_string(&pem_file)
                        .with_context(|| format!("reading {}", pem_file.display()))?;
                    crate::licensing::add_key(
                        store.as_ref(),
                        alg,
                        kid.as_deref(),
                        Some(&pem),
                        activate_in_seconds.saturating_mul(1000),
                        now(),
                    )?
                }
                KeysAction::Retire { kid } => {
                    if !store.retire_signing_key(&kid, now())? {
                        anyhow::bail!("no key `{kid}`");
                    }
                    outln!("key {kid} retired: it left the JWKS");
                    return Ok(());
                }
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                out!("{}", show::key(tz, &info));
            }
            Ok(())
        }
        Command::License {
            db: Db { database },
            plans,
            action,
        } => {
            let store = open_existing(&database)?;
            match action {
                LicenseAction::Issue {
                    account,
                    plan,
                    features,
                    limits,
                    license_id,
                    valid_days,
                    issuer,
                    audience,
                } => {
                    let limits = limits
                        .map(|l| serde_json::from_str(&l).context("--limits is not JSON"))
                        .transpose()?;
                    let Some(plans) = plans else {
                        anyhow::bail!("--plans (or TOLLGATE_PLANS): a license is issued for a plan of the catalogue");
                    };
                    let catalog = CatalogFileWatch::open(Some(&plans))?.current();
                    let issued = crate::licensing::issue(
                        store.as_ref(),
                        &crate::licensing::Issuer {
                            issuer: Some(issuer),
                            audience: Some(audience),
                        },
                        &catalog.plan_names(),
                        &crate::licensing::LicenseRequest {
                            account,
                            plan,
                            features,
                            limits,
                            license_id,
                            valid_days,
                            ..Default::default()
                        },
                        now(),
                    )?;
                    if json {
                        outln!("{}", serde_json::to_string_pretty(&issued)?);
                    } else {
                        // The token alone on stdout, for `TOKEN=$(... license issue ...)`;
                        // what it grants on stderr.
                        eprint!(
                            "{}",
                            show::license(
                                catalog.time_zone,
                                &crate::licensing::ShownLicense {
                                    license: issued.license.clone(),
                                    revoked: None,
                                },
                                now()
                            )
                        );
                        outln!("{}", issued.token);
                    }
                }
                LicenseAction::List { account } => {
                    if let Some(account) = &account {
                        require_known(store.as_ref(), Named::Account(account), false, None)?;
                    }
                    let licenses =
                        crate::licensing::shown_licenses(store.as_ref(), account.as_deref())?;
                    if json {
                        outln!(
                            "{}",
                            serde_json::to_string_pretty(
                                &serde_json::json!({"licenses": licenses})
                            )?
                        );
                    } else {
                        out!(
                            "{}",
                            show::licenses(zone(plans.as_deref())?, &licenses, now())
                        );
                    }
                }
                LicenseAction::Show { license } => {
                    let Some(found) = crate::licensing::shown_license(store.as_ref(), &license)?
                    else {
                        anyhow::bail!("no license `{license}` was issued here (`license list` shows the issued ones)");
                    };
                    if json {
                        outln!("{}", serde_json::to_string_pretty(&found)?);
                    } else {
                        out!("{}", show::license(zone(plans.as_deref())?, &found, now()));
                    }
                }
            }
            Ok(())
        }
        Command::Invoice {
            db: Db { database },
            account,
            plans,
            at,
            csv,
            finalize,
        } => {
            let store = open_existing(&database)?;
            require_known(store.as_ref(), Named::Account(&account), false, None)?;
            let catalog = CatalogFileWatch::open(Some(&plans))?.current();
            let at = at
                .map(|t| rfc3339_arg("at", &t))
                .transpose()?
                .unwrap_or_else(now);
            if finalize {
                let finalized = crate::billing::finalize_in_order(
                    store.as_ref(),
                    &catalog,
                    &account,
                    at,
                    now(),
                )?;
                for (invoice, new) in &finalized {
                    eprintln!(
                        "{} {}",
                        invoice.invoice_id,
                        if *new {
                            "finalised"
                        } else {
                            "finalised before; unchanged"
                        }
                    );
                }
                if let Some((invoice, _)) = finalized.last() {
                    if json {
                        outln!("{}", serde_json::to_string_pretty(invoice)?);
                    } else {
                        out!("{}", show::finalized(catalog.time_zone, invoice));
                    }
                }
                return Ok(());
            }
            let draft = crate::billing::draft(store.as_ref(), &catalog, &account, at, now())?;
            let period = (draft.invoice.period_start_ms, draft.invoice.period_end_ms);
            if store
                .first_usage_ms(&account, period.0, period.1)?
                .is_none()
            {
                eprintln!(
                    "account {account} has no usage from {} to {}: the draft holds fees only",
                    draft.invoice.period_start, draft.invoice.period_end
                );
            }
            if csv {
                out!("{}", draft.invoice.to_csv());
            } else if json {
                outln!("{}", serde_json::to_string_pretty(&draft)?);
            } else {
                out!("{}", show::invoice(catalog.time_zone, &draft));
            }
            Ok(())
        }
        Command::Export {
            db: Db { database },
            from,
            to,
            format,
            plans,
        } => {
            use crate::exports::{self, Format};
            let store = open_existing(&database)?;
            let catalog = CatalogFileWatch::open(plans.as_deref())?.current();
            let (from, to) = (rfc3339_arg("from", &from)?, rfc3339_arg("to", &to)?);
            let mut after = 0;
            let mut all = Vec::new();
            if format == Format::Csv {
                out!("{}", exports::CSV_HEADER);
            }
            loop {
                let page = store.records(
                    from,
                    to,
                    after,
                    10_000,
                    now().saturating_sub(crate::billing::SETTLE_MS),
                )?;
                let Some(last) = page.last() else { break };
                after = last.id;
                match format {
                    Format::Csv => out!("{}", exports::csv_records(&page)),
                    Format::Json => all.extend(exports::json_records(&page)),
                    Format::Stripe => all.extend(exports::stripe_events(&catalog, &page)),
                    Format::Cloudevents => all.extend(exports::cloud_events(&catalog, &page)),
                }
            }
            if format != Format::Csv {
                outln!("{}", serde_json::to_string_pretty(&all)?);
            }
            Ok(())
        }
        Command::Revoke {
            db: Db { database },
            license,
            reason,
            undo,
            force,
        } => {
            let store = open_existing(&database)?;
            require_known(
                store.as_ref(),
                Named::License(&license),
                force,
                Some("--force"),
            )?;
            store.set_revoked(&license, (!undo).then_some(reason.as_str()), now())?;
            outln!(
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
            db: Db { database },
            account,
            reason,
            undo,
            force,
        } => {
            let store = open_existing(&database)?;
            require_known(
                store.as_ref(),
                Named::Account(&account),
                force,
                Some("--force"),
            )?;
            store.set_suspended(&account, (!undo).then_some(reason.as_str()), now())?;
            outln!(
                "account {account} {}",
                if undo { "resumed" } else { "suspended" }
            );
            Ok(())
        }
        Command::Budget {
            db: Db { database },
            account,
            amount,
            period,
            remove,
            force,
        } => {
            let store = open_existing(&database)?;
            require_known(
                store.as_ref(),
                Named::Account(&account),
                force,
                Some("--force"),
            )?;
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
                Some(b) => outln!(
                    "account {account}: budget {} per {}",
                    b.amount,
                    b.period.as_str()
                ),
                None => outln!("account {account}: no budget"),
            }
            Ok(())
        }
        Command::Account {
            db: Db { database },
            account,
            plans,
        } => {
            let store = open_existing(&database)?;
            require_known(store.as_ref(), Named::Account(&account), false, None)?;
            let control = ControlPlane {
                catalog: CatalogFileWatch::open(plans.as_deref())?,
                lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
                ..ControlPlane::default()
            };
            let status = account_status(store.as_ref(), &control, &account, now())?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                out!(
                    "{}",
                    show::account(control.catalog.current().time_zone, &status)
                );
            }
            Ok(())
        }
        Command::Users {
            db: Db { database },
            account,
            plans,
        } => {
            let store = open_existing(&database)?;
            require_known(store.as_ref(), Named::Account(&account), false, None)?;
            let control = ControlPlane {
                catalog: CatalogFileWatch::open(plans.as_deref())?,
                ..ControlPlane::default()
            };
            let report = crate::control::users_report(store.as_ref(), &control, &account, now())?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                out!(
                    "{}",
                    show::users(control.catalog.current().time_zone, &report)
                );
            }
            Ok(())
        }
        Command::Retention {
            db: Db { database },
            older_than_days,
        } => {
            let age = retention_ms(older_than_days, "older-than-days")?;
            let store = open_existing(&database)?;
            let done = crate::privacy::apply_retention(
                store.as_ref(),
                now().saturating_sub(age),
                u32::MAX,
            )?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                out!("{}", show::record(&serde_json::to_value(done)?));
            }
            Ok(())
        }
        Command::ExportData {
            db: Db { database },
            whose,
        } => {
            let store = open_existing(&database)?;
            let export = match (&whose.account, &whose.subject) {
                // No check that the account is known: an empty export is how an erasure is
                // verified.
                (Some(account), _) => store.export_account(account)?,
                (None, Some(subject)) => crate::privacy::export_subject(store.as_ref(), subject)?,
                (None, None) => anyhow::bail!("--account or --subject"),
            };
            outln!("{}", serde_json::to_string_pretty(&export)?);
            Ok(())
        }
        Command::Erase {
            db: Db { database },
            whose,
            yes,
        } => {
            if !yes {
                anyhow::bail!("erasure cannot be undone: export first, then add --yes");
            }
            let store = open_existing(&database)?;
            let erased = match (&whose.account, &whose.subject) {
                (Some(account), _) => {
                    require_known(store.as_ref(), Named::Account(account), false, None)?;
                    crate::privacy::erase_account(store.as_ref(), account, now())?
                }
                (None, Some(subject)) => crate::privacy::erase_subject(store.as_ref(), subject)?,
                (None, None) => anyhow::bail!("--account or --subject"),
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&erased)?);
            } else {
                outln!("erased (rows per table):");
                out!("{}", show::record(&serde_json::to_value(&erased)?));
            }
            Ok(())
        }
        Command::Pseudonym {
            key_id,
            secret,
            user,
            client,
        } => {
            let pseudonyms =
                tollgate_core::pseudonym::Pseudonymizer::new("--key-id", &key_id, &secret)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            let made = match (user, client) {
                (Some(user), _) => {
                    pseudonyms.pseudonym(tollgate_core::pseudonym::Subject::User, &user)
                }
                (None, Some(client)) => {
                    pseudonyms.pseudonym(tollgate_core::pseudonym::Subject::Client, &client)
                }
                (None, None) => anyhow::bail!("--user or --client"),
            };
            outln!("{made}");
            Ok(())
        }
        Command::Usage {
            db: Db { database },
            account,
            license,
            feature,
            meter,
            outcome,
            by,
        } => {
            let store = open_existing(&database)?;
            let query = UsageQuery {
                account,
                license,
                feature,
                meter,
                outcome,
                from_ms: None,
                to_ms: None,
                granularity: Some(by),
            };
            let rows = store.usage(&query)?;
            if rows.is_empty() {
                check_usage_filters(store.as_ref(), &query)?;
            }
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"rows": rows}))?
                );
            } else {
                let mut table = show::Table::new(&[
                    "period", "account", "license", "feature", "outcome", "meter", ">units",
                ]);
                for r in rows {
                    table.row(vec![
                        r.period,
                        r.account,
                        r.license,
                        r.feature,
                        r.outcome,
                        r.meter,
                        r.units.to_string(),
                    ]);
                }
                out!("{}", table.render());
            }
            Ok(())
        }
    }
}

/// The meters every filter measures, valid in `usage --meter` before any usage is stored.
const METERS: [&str; 4] = ["calls", "request_bytes", "response_bytes", "processing_ns"];

/// One column of a usage row.
type RowField = fn(&crate::UsageRow) -> &str;

/// A usage query found nothing: refuse a filter value that matches no stored usage at all,
/// with the values that would, so that a typo (`--meter call`) is not an empty table.
fn check_usage_filters(store: &dyn crate::Store, query: &UsageQuery) -> Result<()> {
    let all = store.usage(&UsageQuery {
        granularity: None,
        ..UsageQuery::default()
    })?;
    let checks: [(&str, &Option<String>, RowField); 5] = [
        ("account", &query.account, |r| &r.account),
        ("license", &query.license, |r| &r.license),
        ("feature", &query.feature, |r| &r.feature),
        ("meter", &query.meter, |r| &r.meter),
        ("outcome", &query.outcome, |r| &r.outcome),
    ];
    for (flag, wanted, field) in checks {
        let Some(wanted) = wanted else { continue };
        let mut valid: std::collections::BTreeSet<&str> = all.iter().map(field).collect();
        if flag == "meter" {
            valid.extend(METERS);
        }
        if !valid.contains(wanted.as_str()) {
            let listed = if valid.is_empty() {
                "none: no usage is stored yet".to_string()
            } else {
                valid.into_iter().collect::<Vec<_>>().join(", ")
            };
            anyhow::bail!(
                "--{flag} {wanted}: no stored usage has this {flag}; valid values: {listed}"
            );
        }
    }
    if [
        &query.account,
        &query.license,
        &query.feature,
        &query.meter,
        &query.outcome,
    ]
    .iter()
    .all(|f| f.is_none())
    {
        eprintln!("no usage is stored yet");
    } else {
        eprintln!("no stored usage matches these filters together");
    }
    Ok(())
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
