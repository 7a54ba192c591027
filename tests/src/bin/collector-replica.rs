//! The collector's own command line, built inside this package so that end-to-end tests can run
//! it as a child process (`CARGO_BIN_EXE_collector-replica`) and kill it with SIGKILL.

fn main() -> anyhow::Result<()> {
    tollgate_collector::cli::main()
}
