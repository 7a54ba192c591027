//! `tollgate-collector`: the collector service and its command line (see [`tollgate_collector::cli`]).

/// An error is one line, `error: <what went wrong>: <why>`, and exit status 1, whatever
/// RUST_BACKTRACE says: operators read it, and a backtrace would bury it.
fn main() -> std::process::ExitCode {
    match tollgate_collector::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
