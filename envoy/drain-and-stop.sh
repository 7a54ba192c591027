#!/bin/sh
# Stop an Envoy that runs Tollgate without losing usage.
#
#   envoy/drain-and-stop.sh ADMIN_URL [PID]
#
# SIGTERM alone makes Envoy exit at once: it does not drain, and the filter's last batches
# (the usage of the last flush interval, and any batch the collector has not acknowledged)
# die with it, since an HTTP call made while Envoy exits never gets its answer. This script
# first lets the filter ship everything:
#   1. fails Envoy's health check (POST /healthcheck/fail), so load balancers stop sending;
#   2. drains the listeners (POST /drain_listeners?graceful): open connections are closed
#      over --drain-time-s, then the listeners stop (with INBOUND_ONLY=1, only listeners
#      marked `traffic_direction: INBOUND`, as in a sidecar: Envoy skips unmarked ones);
#   3. waits until no request is in flight, Tollgate buffers no usage and no batch was
#      acknowledged for QUIET_SECONDS (at least two flush intervals plus the collector's
#      timeout: the last usage is sealed on the next flush tick, then sent);
#   4. stops Envoy: SIGTERM to PID if given, else POST /quitquitquit.
# Exit status 0: stopped with nothing left to ship; 1: TIMEOUT_SECONDS passed first (Envoy is
# stopped anyway, and what was still buffered is printed); 2: usage error.
#
# Environment: QUIET_SECONDS (default 3), TIMEOUT_SECONDS (default 120), INBOUND_ONLY (default
# 0), CURL (default curl).
# Kubernetes: run it as the Envoy container's preStop hook with
# terminationGracePeriodSeconds above --drain-time-s + QUIET_SECONDS + a margin.
set -eu

admin=${1:-}
pid=${2:-}
if [ -z "$admin" ]; then
    echo "usage: $0 ADMIN_URL [PID]   (e.g. $0 http://127.0.0.1:9901)" >&2
    exit 2
fi
quiet=${QUIET_SECONDS:-3}
timeout=${TIMEOUT_SECONDS:-120}
curl=${CURL:-curl}

post() { "$curl" -fsS -m 5 -X POST "$admin$1" >/dev/null; }
# One stat's value (0 when Envoy has not created it yet).
stat() {
    "$curl" -fsS -m 5 "$admin/stats?filter=^$1\$" | awk -F': ' -v n="$1" '$1 == n { v = $2 } END { print v + 0 }'
}
# A Tollgate stat, whichever adapter runs: the wasm filter (`wasmcustom.`) or the native
# module (`dynamicmodulescustom.`).
tollgate_stat() {
    echo $(( $(stat "wasmcustom.tollgate.$1") + $(stat "dynamicmodulescustom.tollgate.$1") ))
}
# Requests in flight on every HTTP connection manager, summed.
active_requests() {
    "$curl" -fsS -m 5 "$admin/stats?filter=downstream_rq_active\$" | awk -F': ' '$1 ~ /^http\./ && $1 !~ /admin/ { s += $2 } END { print s + 0 }'
}

log() { echo "drain-and-stop: $*" >&2; }

stop() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid"
    else
        post /quitquitquit || true
    fi
}

started=$(date +%s)
post /healthcheck/fail
if [ "${INBOUND_ONLY:-0}" = 1 ]; then
    post "/drain_listeners?graceful&inboundonly"
else
    post "/drain_listeners?graceful"
fi
log "listeners draining"

last_acked=-1
quiet_since=$started
stopped=0 active=0 buffered=0
while :; do
    now=$(date +%s)
    if [ $((now - started)) -ge "$timeout" ]; then
        log "gave up after ${timeout} s: listeners stopped $stopped, requests in flight $active, records buffered $buffered"
        stop
        exit 1
    fi
    stopped=$(stat listener_manager.listener_stopped)
    active=$(active_requests)
    buffered=$(tollgate_stat usage_buffered_records)
    acked=$(tollgate_stat usage_records_acked)
    if [ "$stopped" -eq 0 ] || [ "$active" -ne 0 ] || [ "$buffered" -ne 0 ] || [ "$acked" -ne "$last_acked" ]; then
        last_acked=$acked
        quiet_since=$now
    elif [ $((now - quiet_since)) -ge "$quiet" ]; then
        log "listeners stopped, nothing buffered, $acked records acknowledged: stopping"
        stop
        exit 0
    fi
    sleep 0.2
done
