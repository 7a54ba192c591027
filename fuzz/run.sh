#!/usr/bin/env bash
# Coverage-guided fuzzing with libFuzzer on stable Rust, for a bounded time.
#
#   fuzz/run.sh [TARGET...]    build, then run each target (default: all) for FUZZ_SECONDS
#                              seconds (default 20; 0 skips); fails if any target finds a crash
#   fuzz/run.sh build          build the targets only
#   fuzz/run.sh seeds          test the fixtures and regenerate the seed corpus in
#                              fuzz/corpus/ (seed-* files)
#
# cargo-fuzz needs nightly only for its default AddressSanitizer; its coverage flags are stable
# codegen options, so this script passes them itself (no sanitizer: safe Rust needs none for
# memory errors, and a panic, an overflow, a failed debug assertion or a hang is what we look
# for). A target reproduces a finding with: target/fuzz/<host>/release/<target> <artifact>.
#
# FUZZ_ARGS adds libFuzzer flags (split on spaces; later flags win), e.g.
# FUZZ_ARGS="-max_len=65536 -seed=1".
#
# Seeds are read from fuzz/corpus/<target>; inputs libFuzzer finds go to target/fuzz/corpus/
# <target> (kept between runs, removed by `cargo clean`), and crash artifacts to
# target/fuzz/artifacts/<target>.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
manifest=fuzz/Cargo.toml
all_targets=(token config wire collector_ingest)
seconds=${FUZZ_SECONDS:-20}
# libFuzzer takes -max_total_time=0 as "no limit": 0 here skips fuzzing (and its build).
[[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz: FUZZ_SECONDS must be a number of seconds"; exit 2; }
export CARGO_TARGET_DIR="$root/target/fuzz"

if [[ "${1:-}" == seeds ]]; then
    # The generator is a plain binary: built without the coverage flags (instrumented code
    # needs libFuzzer's runtime to link).
    # The fixtures' tests first: a seed that stopped being valid would leave a target stuck.
    cargo test -q --manifest-path "$manifest" -p tollgate-fuzz-common
    rm -f fuzz/corpus/*/seed-*
    cargo run -q --manifest-path "$manifest" -p tollgate-fuzz-common --bin tollgate-fuzz-seeds -- fuzz/corpus
    du -sh fuzz/corpus
    exit 0
fi

if [[ $seconds -eq 0 && "${1:-}" != build ]]; then
    echo "fuzz: skipped (FUZZ_SECONDS=0)"
    exit 0
fi

host=$(rustc -vV | sed -n 's/^host: //p')
# The flags cargo-fuzz passes (without -Zsanitizer). `--target` keeps them off build scripts
# and proc macros, which run on the host and are not linked with libFuzzer.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
build_started=$SECONDS
cargo build --manifest-path "$manifest" -p tollgate-fuzz --release --target "$host" --bins
echo "fuzz: targets built in $((SECONDS - build_started)) s"
[[ "${1:-}" == build ]] && exit 0

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=("${all_targets[@]}")

# The collector target's SQLite store: in memory-backed storage if there is some.
tmp_base=/dev/shm
[[ -d $tmp_base && -w $tmp_base ]] || tmp_base=${TMPDIR:-/tmp}
TOLLGATE_FUZZ_TMP=$(mktemp -d "$tmp_base/tollgate-fuzz.XXXXXX")
export TOLLGATE_FUZZ_TMP
trap 'rm -rf "$TOLLGATE_FUZZ_TMP"' EXIT

failed=()
for target in "${targets[@]}"; do
    bin="$CARGO_TARGET_DIR/$host/release/$target"
    [[ -x $bin ]] || { echo "fuzz: no target '$target' (have: ${all_targets[*]})"; exit 2; }
    found="$CARGO_TARGET_DIR/corpus/$target"
    artifacts="$CARGO_TARGET_DIR/artifacts/$target"
    log="$CARGO_TARGET_DIR/logs/$target.log"
    mkdir -p "$found" "$artifacts" "$(dirname "$log")"
    # New inputs go to the first directory: the committed seeds stay as they are.
    status=0
    "$bin" "$found" "fuzz/corpus/$target" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    coverage=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 || true)
    echo "fuzz: $target: $(stat number_of_executed_units) runs, $(stat average_exec_per_sec) exec/s, ${coverage:-cov: ?}, corpus $(find "$found" "fuzz/corpus/$target" -type f | wc -l) files (log: $log)"
    if [[ $status -ne 0 ]]; then
        failed+=("$target")
        # The next run overwrites the log: keep this one with the artifacts.
        kept="$artifacts/failed-$(date +%Y%m%dT%H%M%S).log"
        cp "$log" "$kept"
        echo "fuzz: $target FAILED (exit $status); the end of its log ($kept):"
        tail -n 40 "$log" | sed 's/^/    /'
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        echo "fuzz: $target: artifact: ${artifact:-none written}"
        [[ -n $artifact ]] && echo "fuzz: reproduce with: $bin $artifact"
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: findings in: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no finding"
