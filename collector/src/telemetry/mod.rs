//! What the collector tells its operator: JSON log lines through `tracing` ([`init_logs`]) and
//! Prometheus metrics ([`metrics`]). Domain modules log with `tracing`'s macros and know nothing
//! of where lines go; a request's lines carry its span (method and path, from `tower-http`).

pub mod metrics;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tracing::Level;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Whether `info` lines (one per batch, per admin change, per request span) are logged; errors
/// and warnings always are. The demo and the benchmarks turn them off.
static INFO_LOGS: AtomicBool = AtomicBool::new(true);

/// Turn `info` lines on or off, at run time.
pub fn set_info_logs(enabled: bool) {
    INFO_LOGS.store(enabled, Ordering::Relaxed);
}

/// Send the process's log lines to standard error, one JSON object per line: `timestamp`,
/// `level`, `message`, the event's fields, `target`, and the enclosing request's span. Once per
/// process; later calls (every collector a test starts) keep the first.
pub fn init_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let lines = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(Stderr)
            .with_filter(filter_fn(|meta| {
                let level = *meta.level();
                level <= Level::WARN || (level == Level::INFO && INFO_LOGS.load(Ordering::Relaxed))
            }));
        // A second subscriber (a program embedding the collector that installed its own) wins.
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(lines));
    });
}

/// Standard error through `eprint!`, so that a test's collector lines are captured with the
/// test's output (and shown when it fails) instead of interleaving with every other test's.
#[derive(Clone, Copy)]
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(line));
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Stderr;
    fn make_writer(&'a self) -> Stderr {
        Stderr
    }
}
