#!/usr/bin/env bash
# bench/run.sh — what `make bench` runs: pushletd against nginx+nchan, same
# client (pushlet-bench), same scenarios, same machine, one after the other.
# Every scenario runs over SSE and again over WebSocket (names ending -ws).
#
#   bench/run.sh [--quick] [--only pushlet|nchan] [--repeat N] [--ws-repeat N]
#                [--scenarios a,c-ws,...] [--out FILE]
#
# Each SSE scenario runs N times per server (3, or 1 with --quick), each
# WebSocket scenario --ws-repeat times (default: as many); the report shows
# the median run (by p99 latency, max deliveries/s or RSS per connection)
# and the gate below checks every run.  --scenarios runs only those listed
# (the report then has only those).
#
# Env: PUSHLETD, PUSHLET_BENCH (binaries; default build/bin/...),
#      NCHAN_MODULE (path of ngx_nchan_module.so), BENCH_OUT (report path),
#      BENCH_PUSHLET_PORT / BENCH_NCHAN_PORT (default 18080 / 18081),
#      BENCH_REPEAT / BENCH_WS_REPEAT (runs per scenario), BENCH_SCENARIOS,
#      BENCH_IDLE_WAIT (max seconds spent waiting for an idle machine before
#      runs; 120, or 0 with --quick).
#
# Builds nothing.  Every server it starts is stopped by PID on exit.
# Exit status: 0 when pushletd lost, duplicated and reordered nothing in
# every scenario, SSE and WebSocket (and every run completed); 1 otherwise;
# 2 on setup errors.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PUSHLETD=${PUSHLETD:-$ROOT/build/bin/pushletd}
PUSHLET_BENCH=${PUSHLET_BENCH:-$ROOT/build/bin/pushlet-bench}
PUSHLET_PORT=${BENCH_PUSHLET_PORT:-18080}
NCHAN_PORT=${BENCH_NCHAN_PORT:-18081}
QUICK=0
ONLY=""
REPEAT=${BENCH_REPEAT:-}
WS_REPEAT=${BENCH_WS_REPEAT:-}
ONLY_SCENARIOS=${BENCH_SCENARIOS:-}
OUT=${BENCH_OUT:-}
CMDLINE="bench/run.sh${*:+ $*}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --only) ONLY=${2:?--only needs pushlet or nchan}; shift ;;
        --out) OUT=${2:?--out needs a path}; shift ;;
        --repeat) REPEAT=${2:?--repeat needs a count}; shift ;;
        --ws-repeat) WS_REPEAT=${2:?--ws-repeat needs a count}; shift ;;
        --scenarios) ONLY_SCENARIOS=${2:?--scenarios needs a list}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$ONLY" in ""|pushlet|nchan) ;; *) echo "run.sh: --only pushlet|nchan" >&2; exit 2 ;; esac
if [ -z "$REPEAT" ]; then if [ "$QUICK" = 1 ]; then REPEAT=1; else REPEAT=3; fi; fi
case "$REPEAT" in [1-9]) ;; *) echo "run.sh: --repeat must be 1..9" >&2; exit 2 ;; esac
[ -n "$WS_REPEAT" ] || WS_REPEAT=$REPEAT
case "$WS_REPEAT" in [1-9]) ;; *) echo "run.sh: --ws-repeat must be 1..9" >&2; exit 2 ;; esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pushlet-bench.XXXXXX")
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
if [ -z "$OUT" ]; then
    # A smoke run must not overwrite the published numbers.
    if [ "$QUICK" = 1 ]; then OUT=$WORK/BENCHMARKS.quick.md; else OUT=$ROOT/docs/BENCHMARKS.md; fi
fi

# ---------------------------------------------------------------- processes
SERVER_PID=""
CLIENT_PID=""

stop_client() {
    if [ -n "$CLIENT_PID" ]; then
        # timeout(1) passes TERM on to the client it runs
        kill -TERM "$CLIENT_PID" 2>/dev/null || true
        wait "$CLIENT_PID" 2>/dev/null || true
        CLIENT_PID=""
    fi
}

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ]; then wait "$SERVER_PID" 2>/dev/null || true; fi
    SERVER_PID=""
}

cleanup() {
    stop_client
    stop_server
    if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------- checks
die() { echo "run.sh: $*" >&2; exit 2; }

find_nchan_module() {
    local m
    for m in "${NCHAN_MODULE:-}" /usr/lib/nginx/modules/ngx_nchan_module.so \
             /usr/share/nginx/modules/ngx_nchan_module.so; do
        if [ -n "$m" ] && [ -f "$m" ]; then echo "$m"; return 0; fi
    done
    return 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    for _ in $(seq 1 100); do
        if port_in_use "$1"; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

[ -x "$PUSHLET_BENCH" ] || die "no client at $PUSHLET_BENCH (build first, or set PUSHLET_BENCH)"
TARGETS="pushlet nchan"
[ -n "$ONLY" ] && TARGETS=$ONLY
if [[ " $TARGETS " == *" pushlet "* ]]; then
    [ -x "$PUSHLETD" ] || die "no server at $PUSHLETD (build first, or set PUSHLETD)"
fi
if [[ " $TARGETS " == *" nchan "* ]]; then
    command -v nginx >/dev/null || die "nginx not installed (Debian: nginx libnginx-mod-nchan)"
    NCHAN_SO=$(find_nchan_module) || die "ngx_nchan_module.so not found (Debian: libnginx-mod-nchan)"
fi
for p in "$PUSHLET_PORT" "$NCHAN_PORT"; do
    if port_in_use "$p"; then die "port $p is busy; set BENCH_PUSHLET_PORT/BENCH_NCHAN_PORT"; fi
done

# 19,000 subscribers need as many descriptors in the client and the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

# Server on CPU 0, client on CPU 1: neither steals the other's core, so the
# server's CPU time and the client's do not distort each other.
SERVER_CPU=(); CLIENT_CPU=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    SERVER_CPU=(taskset -c 0); CLIENT_CPU=(taskset -c 1)
fi

# ------------------------------------------------------------------ servers
start_pushlet() {
    "${SERVER_CPU[@]}" "$PUSHLETD" --listen "127.0.0.1:$PUSHLET_PORT" \
        --max-connections 20000 --heartbeat 30 --log-level warn \
        2>>"$WORK/pushletd.log" &
    SERVER_PID=$!
    wait_port "$PUSHLET_PORT" || { tail -20 "$WORK/pushletd.log" >&2; return 1; }
    SERVER_PIDS=("$SERVER_PID")
    SUB_PATH=/events; PUB_PATH=/publish; PORT=$PUSHLET_PORT
    # WebSocket: /ws?topic=T, JSON envelopes, ready on the "subscribed" reply
    WS_PATH=/ws; WS_PROTOCOL=pushlet
}

start_nchan() {
    local dir=$WORK/nginx
    rm -rf "$dir"; mkdir -p "$dir"
    # Workers drop to this user when started as root; they write temp files.
    chmod 755 "$dir"
    sed -e "s#@NCHAN_MODULE@#$NCHAN_SO#" -e "s#@DIR@#$dir#g" \
        -e "s#@LISTEN@#127.0.0.1:$NCHAN_PORT#" \
        -e "s#@USER@#$(id -un)#" -e "s#@GROUP@#$(id -gn)#" \
        "$ROOT/bench/nchan.conf.in" > "$dir/nginx.conf"
    "${SERVER_CPU[@]}" nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log" \
        2>>"$WORK/nginx.stderr" &
    SERVER_PID=$!
    wait_port "$NCHAN_PORT" || { tail -20 "$dir/error.log" "$WORK/nginx.stderr" >&2; return 1; }
    local kids=""
    for _ in $(seq 1 50); do
        kids=$(cat "/proc/$SERVER_PID/task/$SERVER_PID/children" 2>/dev/null || true)
        [ -n "$kids" ] && break
        sleep 0.1
    done
    [ -n "$kids" ] || return 1
    # shellcheck disable=SC2206
    SERVER_PIDS=("$SERVER_PID" $kids)
    SUB_PATH=/sub; PUB_PATH=/pub; PORT=$NCHAN_PORT
    # WebSocket on the same location: frames carry the raw data, ready on 101
    WS_PATH=/sub; WS_PROTOCOL=raw
}

# ---------------------------------------------------------------- scenarios
# name|title|subscribers|topics|messages|rate|duration|timeout|extra client flags
# Saturation keeps 4 x 32 publishes in flight: with one per connection the
# server and the client take turns (the server idles while the client reads
# and vice versa) and the result measures that ping-pong, not the server.
if [ "$QUICK" = 1 ]; then
    SCENARIOS=(
        "a|100 subscribers, 1 topic, 100 msg/s|100|1|200|100|0|30"
        "b|1,000 subscribers, 1 topic, 10 msg/s|1000|1|20|10|0|30"
        "c|Saturation: 200 subscribers, 1 topic, flat out|200|1|100000000|0|2|30|--pipeline 32 --window 4096"
        "d|1,000 subscribers on 1,000 topics, 1,000 msg/s|1000|1000|2000|1000|0|30"
        "e|1,000 idle connections|1000|1|0|0|0|30"
    )
    WS_SCENARIOS=(
        "a-ws|100 WebSocket subscribers, 1 topic, 100 msg/s|100|1|200|100|0|30|--transport ws"
        "b-ws|1,000 WebSocket subscribers, 1 topic, 10 msg/s|1000|1|20|10|0|30|--transport ws"
        "c-ws|Saturation: 200 WebSocket subscribers, 1 topic, flat out|200|1|100000000|0|2|30|--pipeline 32 --window 4096 --transport ws"
        "d-ws|1,000 WebSocket subscribers on 1,000 topics, 1,000 msg/s|1000|1000|2000|1000|0|30|--transport ws"
        "e-ws|1,000 idle WebSocket connections|1000|1|0|0|0|30|--transport ws"
    )
else
    SCENARIOS=(
        "a|1,000 subscribers, 1 topic, 20 msg/s (20k deliveries/s)|1000|1|200|20|0|60"
        "b|10,000 subscribers, 1 topic, 2 msg/s (20k deliveries/s)|10000|1|20|2|0|90"
        "c|Saturation: 1,000 subscribers, 1 topic, flat out for 10 s|1000|1|100000000|0|10|90|--pipeline 32 --window 4096"
        "d|10,000 subscribers on 10,000 topics, 2,000 msg/s|10000|10000|20000|2000|0|90"
        "e|19,000 idle connections (memory per connection)|19000|1|0|0|0|120"
    )
    # The same scenarios over WebSocket: pushletd's /ws?topic=T (binary
    # frames, JSON envelope), nchan's websocket subscriber on /sub.
    WS_SCENARIOS=(
        "a-ws|1,000 WebSocket subscribers, 1 topic, 20 msg/s (20k deliveries/s)|1000|1|200|20|0|60|--transport ws"
        "b-ws|10,000 WebSocket subscribers, 1 topic, 2 msg/s (20k deliveries/s)|10000|1|20|2|0|90|--transport ws"
        "c-ws|Saturation: 1,000 WebSocket subscribers, 1 topic, flat out for 10 s|1000|1|100000000|0|10|90|--pipeline 32 --window 4096 --transport ws"
        "d-ws|10,000 WebSocket subscribers on 10,000 topics, 2,000 msg/s|10000|10000|20000|2000|0|90|--transport ws"
        "e-ws|19,000 idle WebSocket connections (memory per connection)|19000|1|0|0|0|120|--transport ws"
    )
fi

# --scenarios a,c-ws: keep only those (both lists)
selected() { # scenario-line -> true if it is to run
    [ -n "$ONLY_SCENARIOS" ] || return 0
    [[ ",$ONLY_SCENARIOS," == *",${1%%|*},"* ]]
}
filter_scenarios() { # array name
    local -n arr=$1
    local kept=() l
    for l in "${arr[@]}"; do if selected "$l"; then kept+=("$l"); fi; done
    arr=("${kept[@]}")
}
filter_scenarios SCENARIOS
filter_scenarios WS_SCENARIOS
[ $(( ${#SCENARIOS[@]} + ${#WS_SCENARIOS[@]} )) -gt 0 ] || die "--scenarios matched nothing"

FAILED=0

run_one() { # target scenario-line run-number runs
    local target=$1 line=$2 run=$3 runs=$4 name title subs topics msgs rate dur tmo extra
    IFS='|' read -r name title subs topics msgs rate dur tmo extra <<<"$line"
    echo ">> $target: ($name) $title [run $run/$runs]" >&2
    if ! "start_$target"; then
        echo "run.sh: $target failed to start" >&2
        FAILED=1
        stop_server
        return
    fi
    local pids=() p sub_path=$SUB_PATH ws=()
    for p in "${SERVER_PIDS[@]}"; do pids+=(--pid "$p"); done
    case " $extra " in
        *" --transport ws "*) sub_path=$WS_PATH; ws=(--ws-protocol "$WS_PROTOCOL") ;;
    esac
    local json rc=0
    # In the background so that a signal reaches our trap at once (bash
    # defers traps until a foreground child exits); killed by PID on exit.
    # shellcheck disable=SC2086
    timeout -k 5 $((tmo + 30)) "${CLIENT_CPU[@]}" "$PUSHLET_BENCH" \
        --scenario "$name" --target "$target" --port "$PORT" \
        --sub-path "$sub_path" --pub-path "$PUB_PATH" "${ws[@]}" \
        --subscribers "$subs" --topics "$topics" --messages "$msgs" \
        --rate "$rate" --duration "$dur" --timeout "$tmo" "${pids[@]}" $extra \
        > "$WORK/client.json" &
    CLIENT_PID=$!
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    json=$(cat "$WORK/client.json")
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "run.sh: $target died during scenario $name" >&2
        rc=99
    fi
    stop_server
    [ -n "$json" ] || json="{\"scenario\":\"$name\",\"target\":\"$target\",\"status\":\"no-result\"}"
    echo "${json%\}},\"run\":$run,\"exit\":$rc}" >> "$RESULTS"
    if [ "$rc" != 0 ]; then
        echo "run.sh: $target scenario $name: client exit $rc" >&2
        if [ "$target" = pushlet ]; then FAILED=1; fi
    fi
}

cpu_busy_pct() { # share of all CPUs busy over one second, from /proc/stat
    local a b
    a=$(head -1 /proc/stat); sleep 1; b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ");
        for (i = 2; i <= n && i <= 9; i++) { d = y[i] - x[i]; t += d; if (i != 5 && i != 6) busy += d }
        printf "%.0f", t ? 100 * busy / t : 0 }'
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY_START=$(cpu_busy_pct)
# Other work on this machine (builds, tests) shows up as noise in latency and
# core figures: before each run, wait up to 20 s for the CPUs to go quiet,
# spending at most 120 s on waiting in the whole run (none in --quick).
IDLE_BUDGET=${BENCH_IDLE_WAIT:-}
if [ -z "$IDLE_BUDGET" ]; then if [ "$QUICK" = 1 ]; then IDLE_BUDGET=0; else IDLE_BUDGET=120; fi; fi
IDLE_BUDGET_START=$IDLE_BUDGET
wait_quiet() {
    local waited=0 b
    while [ "$IDLE_BUDGET" -gt 0 ] && [ "$waited" -lt 20 ]; do
        b=$(cpu_busy_pct)
        [ "$b" -le 5 ] && return 0
        waited=$((waited + 1)); IDLE_BUDGET=$((IDLE_BUDGET - 1))
    done
    return 0
}

T0=$(date +%s)
for s in "${SCENARIOS[@]}"; do
    for r in $(seq 1 "$REPEAT"); do
        for t in $TARGETS; do wait_quiet; run_one "$t" "$s" "$r" "$REPEAT"; done
    done
done
T_SSE=$(( $(date +%s) - T0 ))
for s in "${WS_SCENARIOS[@]}"; do
    for r in $(seq 1 "$WS_REPEAT"); do
        for t in $TARGETS; do wait_quiet; run_one "$t" "$s" "$r" "$WS_REPEAT"; done
    done
done
ELAPSED=$(( $(date +%s) - T0 ))
T_WS=$(( ELAPSED - T_SSE ))

# ------------------------------------------------------------------- report
jget() { # json key -> value (our JSON is flat)
    sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1"
}

median_key() { # scenario -> the metric that picks the median run
    case "${1%-ws}" in
        c) echo deliveries_per_s ;;
        e) echo rss_per_conn_bytes ;;
        *) echo lat_p99_us ;;
    esac
}

result() { # scenario target -> the JSON line of the median run
    local key lines
    key=$(median_key "$1")
    lines=$(grep "\"scenario\":\"$1\",\"target\":\"$2\"" "$RESULTS" || true)
    [ -n "$lines" ] || return 0
    while read -r l; do
        printf '%s\t%s\n' "$(jget "$l" "$key")" "$l"
    done <<<"$lines" | sort -g | awk -F'\t' '{ a[NR] = $2 } END { print a[int((NR + 1) / 2)] }'
}

fmt() { # number -> human (k/M) or "-"
    local v=${1:-}
    [ -n "$v" ] || { echo "-"; return; }
    awk -v v="$v" 'BEGIN { if (v == "") { print "-"; exit }
        if (v < 0) { print "-"; exit }
        a = v;
        if (a >= 1e6) printf "%.2fM", v / 1e6;
        else if (a >= 1e4) printf "%.1fk", v / 1e3;
        else if (a >= 100 || v == int(v)) printf "%.0f", v;
        else printf "%.2f", v }'
}

ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN {
    if (a == "" || b == "" || a + 0 < 0 || b + 0 <= 0) { print "-"; exit }
    r = a / b; printf(r < 0.1 ? "%.3f" : "%.2f", r) }'; }

row() { # label key scenario
    local p n
    p=$(jget "$(result "$3" pushlet)" "$2"); n=$(jget "$(result "$3" nchan)" "$2")
    echo "| $1 | $(fmt "$p") | $(fmt "$n") | $(ratio "$p" "$n") |"
}

row_ms() { # latency keys are in µs; show ms
    local p n
    p=$(jget "$(result "$3" pushlet)" "$2"); n=$(jget "$(result "$3" nchan)" "$2")
    p=${p:+$(awk -v v="$p" 'BEGIN{printf "%.3f", v/1000}')}
    n=${n:+$(awk -v v="$n" 'BEGIN{printf "%.3f", v/1000}')}
    echo "| $1 | ${p:--} | ${n:--} | $(ratio "$p" "$n") |"
}

row_pct() { # fraction -> percent
    local p n
    p=$(jget "$(result "$3" pushlet)" "$2"); n=$(jget "$(result "$3" nchan)" "$2")
    p=${p:+$(awk -v v="$p" 'BEGIN{ if (v < 0) print "-"; else printf "%.0f", v*100}')}
    n=${n:+$(awk -v v="$n" 'BEGIN{ if (v < 0) print "-"; else printf "%.0f", v*100}')}
    echo "| $1 | ${p:--} | ${n:--} | |"
}

row_kb() { # bytes -> KiB with one decimal
    local p n
    p=$(jget "$(result "$3" pushlet)" "$2"); n=$(jget "$(result "$3" nchan)" "$2")
    p=${p:+$(awk -v v="$p" 'BEGIN{printf "%.2f", v/1024}')}
    n=${n:+$(awk -v v="$n" 'BEGIN{printf "%.2f", v/1024}')}
    echo "| $1 | ${p:--} | ${n:--} | $(ratio "$p" "$n") |"
}

checks_row() {
    local t j c
    printf '| lost / duplicated / reordered / order diverged / disconnects / status |'
    for t in pushlet nchan; do
        j=$(result "$1" "$t")
        if [ -z "$j" ]; then printf ' - |'; continue; fi
        c="$(jget "$j" lost) / $(jget "$j" duplicated) / $(jget "$j" reordered) / $(jget "$j" order_diverged) / $(jget "$j" disconnects) / $(jget "$j" status)"
        printf ' %s |' "$c"
    done
    echo ' |'
}

table_header() {
    echo "| metric | pushlet | nchan | pushlet / nchan |"
    echo "|---|---:|---:|---:|"
}

latency_tables() { # scenario
    table_header
    row "deliveries/s (higher is better)" deliveries_per_s "$1"
    row "messages published/s" publish_per_s "$1"
    row_ms "latency p50, ms (lower is better)" lat_p50_us "$1"
    row_ms "latency p90, ms" lat_p90_us "$1"
    row_ms "latency p99, ms" lat_p99_us "$1"
    row_ms "latency max, ms" lat_max_us "$1"
    row "server CPU per delivery, ns: process utime+stime (lower is better)" server_cpu_ns_per_delivery "$1"
    row "server CPU per delivery, ns: + softirq on its core (lower is better)" server_total_ns_per_delivery "$1"
    row_pct "server core busy, %" server_core_util "$1"
    row_pct "client core busy, %" client_core_util "$1"
    row_pct "other work on the server's core, % (noise)" server_core_other_util "$1"
    row_pct "other work on the client's core, % (noise)" client_core_other_util "$1"
    row "deliveries checked" deliveries "$1"
    checks_row "$1"
    client_bound_note "$1"
}

client_bound_note() { # a saturated client caps what the server can show
    local t u busy=""
    for t in pushlet nchan; do
        u=$(jget "$(result "$1" "$t")" client_core_util)
        if awk -v u="${u:--1}" 'BEGIN { exit !(u >= 0.9) }'; then
            busy+="${busy:+, }$t run $(awk -v u="$u" 'BEGIN{printf "%.0f", u*100}') %"
        fi
    done
    [ -n "$busy" ] || return 0
    echo
    echo "The client's core was at least 90 % busy ($busy): deliveries/s there may be"
    echo "capped by the client on this two-core machine, not by the server. The CPU per"
    echo "delivery is the figure to compare."
}

idle_table() {
    table_header
    row_kb "server RSS per connection, KiB (lower is better)" rss_per_conn_bytes "$1"
    row "server RSS before, KiB" rss_before_kb "$1"
    row "server RSS with all connected, KiB" rss_ready_kb "$1"
    row "connections held" connected "$1"
    row "time to connect all, s" connect_s "$1"
    checks_row "$1"
}

machine_section() {
    local cpu mem
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    mem=$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    echo "- CPU: ${cpu:-unknown}, $(nproc) cores (nproc); memory $mem"
    echo "- Kernel: $(uname -sr); open-file limit per process: $NOFILE"
    echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //'); nchan module: \`${NCHAN_SO:-n/a}\`" \
         "($(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?'))"
    echo "- libuv: $(pkg-config --modversion libuv 2>/dev/null || echo '?');" \
         "pushlet commit: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'unknown')"
    echo "- Pinning: ${SERVER_CPU[*]:-none} for the server, ${CLIENT_CPU[*]:-none} for the client"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); whole run: ${ELAPSED} s, of which"
    echo "  $((IDLE_BUDGET_START - IDLE_BUDGET)) s waiting for an idle machine (at most $IDLE_BUDGET_START s)"
    echo "- Other work: CPUs ${BUSY_START} % busy in the second before the run; load average"
    echo "  (1/5/15 min) $LOAD_START before, $(cut -d' ' -f1-3 /proc/loadavg) after"
    if [ "$BUSY_START" -gt 10 ]; then
        echo "- **The machine was not idle when the run started**: other work shared the cores, so"
        echo "  the core-busy figures and the latencies carry its noise."
    fi
}

scenario_sections() { # array name (SCENARIOS or WS_SCENARIOS)
    local -n list=$1
    local s name title subs topics msgs rate dur tmo extra
    for s in "${list[@]}"; do
        IFS='|' read -r name title subs topics msgs rate dur tmo extra <<<"$s"
        echo "### ($name) $title"
        echo
        echo "Client: \`--subscribers $subs --topics $topics --messages $msgs --rate $rate" \
             "--duration $dur${extra:+ $extra}\`"
        echo
        if [ "$msgs" = 0 ]; then idle_table "$name"; else latency_tables "$name"; fi
        echo
    done
}

scale() { # value scale(1|ms|kb) -> scaled value (empty stays empty)
    [ -n "$1" ] || return 0
    case "$2" in
        ms) awk -v v="$1" 'BEGIN{printf "%.2f", v/1000}' ;;
        kb) awk -v v="$1" 'BEGIN{printf "%.2f", v/1024}' ;;
        *) echo "$1" ;;
    esac
}

noisy_runs() { # runs in which other work took >= 10 % of the server's or the client's core
    local j so co list=""
    while read -r j; do
        so=$(jget "$j" server_core_other_util); co=$(jget "$j" client_core_other_util)
        if awk -v a="${so:--1}" -v b="${co:--1}" 'BEGIN { exit !(a >= 0.10 || b >= 0.10) }'; then
            list+="${list:+; }($(jget "$j" scenario)) $(jget "$j" target) run $(jget "$j" run):"
            list+=" $(awk -v a="$so" -v b="$co" 'BEGIN { printf "%.0f %% / %.0f %%", a * 100, b * 100 }')"
        fi
    done < "$RESULTS"
    [ -n "$list" ] || return 0
    echo "**Runs disturbed by other work on the machine** (other work on the server's / the client's"
    echo "core, at least 10 % on one of them; a table's median run may be one of these, so"
    echo "compare its \"other work\" rows): $list."
    echo
}

has_result() { [ -n "$(result "$1" pushlet)$(result "$1" nchan)" ]; }

headline_row() { # scenario label key scale(1|ms|kb)
    local p n
    has_result "$1" || return 0
    p=$(scale "$(jget "$(result "$1" pushlet)" "$3")" "$4")
    n=$(scale "$(jget "$(result "$1" nchan)" "$3")" "$4")
    echo "| ($1) | $2 | $(fmt "$p") | $(fmt "$n") | $(ratio "$p" "$n") |"
}

headline() { # suffix: "" (SSE) or "-ws"
    local x=$1
    echo "| scenario | metric | pushlet | nchan | pushlet / nchan |"
    echo "|---|---|---:|---:|---:|"
    headline_row "a$x" "latency p99, ms" lat_p99_us ms
    headline_row "b$x" "latency p99, ms" lat_p99_us ms
    headline_row "c$x" "max deliveries/s" deliveries_per_s 1
    headline_row "c$x" "server CPU per delivery (with softirq), ns" server_total_ns_per_delivery 1
    headline_row "d$x" "latency p99, ms" lat_p99_us ms
    headline_row "d$x" "server CPU per delivery (with softirq), ns" server_total_ns_per_delivery 1
    headline_row "e$x" "server RSS per connection, KiB" rss_per_conn_bytes kb
}

transport_row() { # scenario label key scale: one server's SSE figure next to its WebSocket one
    local t v line=""
    has_result "$1" && has_result "$1-ws" || return 0
    for t in pushlet nchan; do
        local sse ws
        sse=$(scale "$(jget "$(result "$1" "$t")" "$3")" "$4")
        ws=$(scale "$(jget "$(result "$1-ws" "$t")" "$3")" "$4")
        line+=" $(fmt "$sse") | $(fmt "$ws") | $(ratio "$ws" "$sse") |"
    done
    echo "| ($1) | $2 |$line"
}

transport_table() {
    echo "| scenario | metric | pushlet SSE | pushlet WS | WS / SSE | nchan SSE | nchan WS | WS / SSE |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    transport_row a "latency p99, ms" lat_p99_us ms
    transport_row b "latency p99, ms" lat_p99_us ms
    transport_row c "max deliveries/s" deliveries_per_s 1
    transport_row c "server CPU per delivery (with softirq), ns" server_total_ns_per_delivery 1
    transport_row d "latency p99, ms" lat_p99_us ms
    transport_row d "server CPU per delivery (with softirq), ns" server_total_ns_per_delivery 1
    transport_row e "server RSS per connection, KiB" rss_per_conn_bytes kb
}

# The soak: 20,000 connections opened and dropped every way while publishing; the server must
# give back every fd and its memory (tests/soak/churn.py, also part of `make test`).
run_soak() {
    local n=20000
    [ "$QUICK" = 1 ] && n=2000
    if /usr/bin/python3 "$ROOT/tests/soak/churn.py" --pushletd "$PUSHLETD" --connections "$n" \
        > "$WORK/soak.txt" 2>&1; then
        SOAK_RESULT=PASS
    else
        SOAK_RESULT=FAIL
        FAILED=1
        tail -20 "$WORK/soak.txt" >&2
    fi
}

soak_section() {
    echo "## Soak: connection churn"
    echo
    echo "\`tests/soak/churn.py\` against the same pushletd (not pinned, sharing both cores with"
    echo "its clients): RSS and open fds before the churn (after a warm-up), at the peak, and after"
    echo "every connection is gone. Result: **$SOAK_RESULT**. What each kind of connection does:"
    echo "\`tests/soak/README.md\`."
    echo
    echo '```'
    sed -n '/^figures/,/^  \/stats after/p' "$WORK/soak.txt"
    echo '```'
    echo
}

# Sections other benchmarks write into the same file (bench/distributed.sh,
# bench/python_publish.py): carried over from the previous report, unchanged.
kept_sections() {
    local old=$ROOT/docs/BENCHMARKS.md
    [ -f "$old" ] || return 0
    awk '/^## (Python binding|Distributed)/ {keep = 1; print; next}
         /^## / {keep = 0}
         keep {print}' "$old"
}

write_report() {
    local kept
    kept=$(kept_sections)
    {
        echo "# Benchmarks: pushletd vs nginx + nchan"
        echo
        echo "Generated by \`bench/run.sh\` (what \`make bench\` runs); do not edit by hand. The"
        echo "Python and distributed sections come from their own scripts and are carried over."
        if [ "$QUICK" = 1 ]; then echo "**Quick mode**: small N, a smoke test, not a measurement."; fi
        echo
        echo "## Machine"
        echo
        machine_section
        echo
        echo "## Command"
        echo
        echo '```'
        echo "PUSHLETD=$PUSHLETD PUSHLET_BENCH=$PUSHLET_BENCH $CMDLINE"
        echo '```'
        echo
        if [ ${#SCENARIOS[@]} -gt 0 ]; then
            echo "## Headline: SSE"
            echo
            headline ""
            echo
        fi
        if [ ${#WS_SCENARIOS[@]} -gt 0 ]; then
            echo "## Headline: WebSocket"
            echo
            headline -ws
            echo
        fi
        if [ ${#SCENARIOS[@]} -gt 0 ] && [ ${#WS_SCENARIOS[@]} -gt 0 ]; then
            echo "## WebSocket against SSE, same server"
            echo
            echo "Each server's median run over SSE next to the same scenario over WebSocket."
            echo
            transport_table
            echo
        fi
        echo "## How to read the results"
        echo
        echo "Ratios are pushlet ÷ nchan: above 1 is better for throughput, below 1 is"
        echo "better for latency, CPU and memory. Each SSE scenario ran $REPEAT time(s) per server"
        echo "(${T_SSE} s in all), each WebSocket scenario $WS_REPEAT time(s) (${T_WS} s in all);"
        echo "the table shows the median run (by p99 latency; by deliveries/s for (c); by RSS"
        echo "per connection for (e)). Every run is in the raw results below."
        echo
        noisy_runs
        if [ ${#SCENARIOS[@]} -gt 0 ]; then
            echo "## Results: SSE"
            echo
            scenario_sections SCENARIOS
        fi
        if [ ${#WS_SCENARIOS[@]} -gt 0 ]; then
            echo "## Results: WebSocket"
            echo
            scenario_sections WS_SCENARIOS
        fi
        soak_section
        if [ -n "$kept" ]; then printf '%s\n\n' "$kept"; fi
        cat "$ROOT/bench/METHOD.md"
        echo
        echo "## Raw results (one JSON line per run)"
        echo
        echo '```'
        cat "$RESULTS"
        echo '```'
    } > "$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
}

run_soak
write_report
echo "run.sh: report written to $OUT (${ELAPSED} s)" >&2

# The pass/fail gate: pushletd must lose, duplicate and reorder nothing.
while read -r j; do
    [ "$(jget "$j" target)" = pushlet ] || continue
    for k in lost duplicated reordered order_diverged; do
        v=$(jget "$j" "$k")
        if [ "${v:-x}" != 0 ]; then
            echo "run.sh: FAIL pushlet scenario $(jget "$j" scenario): $k=${v:-missing}" >&2
            FAILED=1
        fi
    done
done < "$RESULTS"
if [ "$FAILED" != 0 ]; then
    echo "run.sh: FAILED" >&2
    exit 1
fi
echo "run.sh: OK — pushlet lost, duplicated and reordered nothing (SSE and WebSocket)" >&2
