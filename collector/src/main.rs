//! `tollgate-collector`: the collector service and its command line (see [`tollgate_collector::cli`]).

fn main() -> anyhow::Result<()> {
    tollgate_collector::cli::main()
}
