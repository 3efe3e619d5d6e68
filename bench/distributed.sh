#!/usr/bin/env bash
# bench/distributed.sh — two nodes on one Redis, against two nginx+nchan
# instances on one Redis: subscribers on node B, publishes on node A, so
# every delivery crosses Redis (publish on A -> Redis -> B -> subscriber).
#
#   bench/distributed.sh [--only pushlet|nchan] [--transports sse,ws]
#                        [--subscribers N] [--rate R] [--seconds S]
#                        [--flat-seconds S] [--publish-seconds S]
#                        [--repeat N] [--out FILE]
#                        [--scenarios r,f,r-ws,f-ws] [--update-doc]
#
# For each transport (SSE, then WebSocket) and each target (pushlet, nchan):
#   (r) N subscribers (1,000) on B, one topic, R msg/s (20) published on A
#       for S s (10): latency at a fixed, modest load;
#   (f) the same subscribers, publishes on A flat out for --flat-seconds
#       (10; 4 connections x 32 pipelined requests, window 1,024): the
#       highest cross-node fan-out rate;
#   (p) SSE only: 100 subscribers on B on 100 topics, one each, publishes
#       on A flat out for --publish-seconds (5): every delivery needs its own
#       publish, so this is the highest rate of messages through
#       A -> Redis -> B.
# --scenarios runs only those named (e.g. r-ws); --repeat N runs each N
# times and reports the median run.
# Each run gets a fresh redis-server (--save "" --appendonly no, on a free
# loopback port) and fresh nodes.  The client is bench/pushlet_bench.c
# (subscribes with --port = B, publishes with --pub-port = A) and checks
# every delivery: loss, duplicates, reordering, order divergence, latency
# (send time in the body -> receive time, one monotonic clock).
#
# Layout (2 cores): Redis, A and B share CPU 0, the client has CPU 1, for
# both targets.  The CPU figures therefore cover the whole cluster.
#
# Output: one JSON line per run plus a Markdown report (stdout, or --out
# FILE).  --update-doc also replaces the block between the markers
# "<!-- distributed.sh:begin -->" and "<!-- distributed.sh:end -->" in
# docs/BENCHMARKS.md (the section "## Distributed: 2 nodes + Redis").
#
# Env: PUSHLETD, PUSHLET_BENCH (default build/bin/...), NCHAN_MODULE,
#      REDIS_SERVER (default redis-server), DIST_PORT_BASE (18090: pushlet
#      A/B on +0/+1, nchan A/B on +2/+3), DIST_REDIS_PORT (first port tried
#      for Redis, 16400), DIST_HISTORY (per-topic history on both, 10000),
#      DIST_IDLE_WAIT (max seconds spent in all waiting for idle CPUs before
#      runs, 60; 0 = never wait).
#
# Builds nothing.  Every process it starts is stopped by PID on exit.  Every
# load is bounded: by message count and by time (client --timeout, plus
# timeout(1) around it).  Only 127.0.0.1 is used.
# Exit status: 0 when pushlet lost, duplicated and reordered nothing in
# every run (and every run completed); 1 otherwise; 2 on setup errors.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PUSHLETD=${PUSHLETD:-$ROOT/build/bin/pushletd}
PUSHLET_BENCH=${PUSHLET_BENCH:-$ROOT/build/bin/pushlet-bench}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
PORT_BASE=${DIST_PORT_BASE:-18090}
REDIS_PORT_FIRST=${DIST_REDIS_PORT:-16400}
HISTORY=${DIST_HISTORY:-10000}
ONLY=""
ONLY_SCENARIOS=""
TRANSPORTS="sse,ws"
SUBS=1000
RATE=20
SECONDS_R=10
SECONDS_F=10
SECONDS_P=5
REPEAT=1
OUT=""
UPDATE_DOC=0
CMDLINE="bench/distributed.sh${*:+ $*}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "distributed.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY=${2:?--only needs pushlet or nchan}; shift ;;
        --transports) TRANSPORTS=${2:?--transports needs sse,ws}; shift ;;
        --subscribers) SUBS=${2:?}; shift ;;
        --rate) RATE=${2:?}; shift ;;
        --seconds) SECONDS_R=${2:?}; shift ;;
        --flat-seconds) SECONDS_F=${2:?}; shift ;;
        --publish-seconds) SECONDS_P=${2:?}; shift ;;
        --repeat) REPEAT=${2:?}; shift ;;
        --scenarios) ONLY_SCENARIOS=${2:?--scenarios needs a list}; shift ;;
        --out) OUT=${2:?--out needs a path}; shift ;;
        --update-doc) UPDATE_DOC=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "distributed.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$ONLY" in ""|pushlet|nchan) ;; *) die "--only pushlet|nchan" ;; esac
case "$SUBS" in ''|*[!0-9]*) die "--subscribers must be a number" ;; esac
in_range() { [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }
in_range "$SUBS" 1 18000 || die "--subscribers must be 1..18000"
case "$REPEAT" in [1-5]) ;; *) die "--repeat must be 1..5" ;; esac
for v in "$RATE" "$SECONDS_R" "$SECONDS_F" "$SECONDS_P"; do
    case "$v" in ''|*[!0-9]*) die "--rate/--seconds/--flat-seconds must be whole numbers" ;; esac
done
in_range "$RATE" 1 100000 || die "--rate must be 1..100000"
in_range "$SECONDS_R" 1 60 || die "--seconds must be 1..60"
in_range "$SECONDS_F" 1 60 || die "--flat-seconds must be 1..60"
in_range "$SECONDS_P" 1 60 || die "--publish-seconds must be 1..60"
TRANSPORT_LIST=()
IFS=',' read -r -a _t <<<"$TRANSPORTS"
for t in "${_t[@]}"; do
    case "$t" in sse|ws) TRANSPORT_LIST+=("$t") ;; *) die "--transports: sse and/or ws" ;; esac
done
[ ${#TRANSPORT_LIST[@]} -gt 0 ] || die "--transports is empty"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pushlet-dist.XXXXXX")
RESULTS=$WORK/results.jsonl
: > "$RESULTS"

# ---------------------------------------------------------------- processes
# Every PID we start, in start order; stopped in reverse order on exit.
REDIS_PID=""
NODE_PIDS=()   # the two node processes (pushletd, or nginx masters)
CLIENT_PID=""

stop_pid() { # pid: TERM, wait up to 10 s, then KILL
    local p=$1
    [ -n "$p" ] || return 0
    if kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
    fi
    wait "$p" 2>/dev/null || true
}

stop_client() {
    if [ -n "$CLIENT_PID" ]; then
        kill -TERM "$CLIENT_PID" 2>/dev/null || true
        wait "$CLIENT_PID" 2>/dev/null || true
        CLIENT_PID=""
    fi
}

stop_cluster() {
    local i
    for ((i = ${#NODE_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${NODE_PIDS[$i]}"; done
    NODE_PIDS=()
    stop_pid "$REDIS_PID"
    REDIS_PID=""
}

cleanup() {
    stop_client
    stop_cluster
    if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------- checks
find_nchan_module() {
    local m
    for m in "${NCHAN_MODULE:-}" /usr/lib/nginx/modules/ngx_nchan_module.so \
             /usr/share/nginx/modules/ngx_nchan_module.so; do
        if [ -n "$m" ] && [ -f "$m" ]; then echo "$m"; return 0; fi
    done
    return 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port pid: until the port answers, 10 s at most, while pid lives
    for _ in $(seq 1 100); do
        if port_in_use "$1"; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

command -v "$REDIS_SERVER" >/dev/null || die "no $REDIS_SERVER (Debian: redis-server)"
[ -x "$PUSHLET_BENCH" ] || die "no client at $PUSHLET_BENCH (build with -DPUSHLET_BUILD_BENCH=ON, or set PUSHLET_BENCH)"
"$PUSHLET_BENCH" --help 2>&1 | grep -q -- '--pub-port' \
    || die "$PUSHLET_BENCH has no --pub-port (rebuild it from this tree)"
TARGETS="pushlet nchan"
[ -n "$ONLY" ] && TARGETS=$ONLY
if [[ " $TARGETS " == *" pushlet "* ]]; then
    [ -x "$PUSHLETD" ] || die "no server at $PUSHLETD (build first, or set PUSHLETD)"
    "$PUSHLETD" --help 2>&1 | grep -q -- '--redis' \
        || die "$PUSHLETD has no --redis flag (distributed mode not built in); use --only nchan"
fi
NCHAN_SO=""
if [[ " $TARGETS " == *" nchan "* ]]; then
    command -v nginx >/dev/null || die "nginx not installed (Debian: nginx libnginx-mod-nchan)"
    NCHAN_SO=$(find_nchan_module) || die "ngx_nchan_module.so not found (Debian: libnginx-mod-nchan)"
fi
for p in $((PORT_BASE)) $((PORT_BASE + 1)) $((PORT_BASE + 2)) $((PORT_BASE + 3)); do
    if port_in_use "$p"; then die "port $p is busy; set DIST_PORT_BASE"; fi
done

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

SERVER_CPU=(); CLIENT_CPU=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    SERVER_CPU=(taskset -c 0); CLIENT_CPU=(taskset -c 1)
fi

# ------------------------------------------------------------------ cluster
start_redis() {
    local p=$REDIS_PORT_FIRST
    while port_in_use "$p"; do
        p=$((p + 1))
        [ "$p" -lt $((REDIS_PORT_FIRST + 100)) ] || { echo "no free port for Redis" >&2; return 1; }
    done
    REDIS_PORT=$p
    "${SERVER_CPU[@]}" "$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save "" --appendonly no --daemonize no --protected-mode yes \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    wait_port "$REDIS_PORT" "$REDIS_PID" || { tail -20 "$WORK/redis.log" >&2; return 1; }
}

server_pids() { # pid... -> that pid and its children (nginx master + worker)
    local p kids
    for p in "$@"; do
        echo "$p"
        kids=$(cat "/proc/$p/task/$p/children" 2>/dev/null || true)
        [ -z "$kids" ] || echo "$kids" | tr ' ' '\n' | sed '/^$/d'
    done
}

start_pushlet() {
    start_redis || return 1
    local port node
    for node in A B; do
        if [ "$node" = A ]; then port=$PORT_BASE; else port=$((PORT_BASE + 1)); fi
        "${SERVER_CPU[@]}" "$PUSHLETD" --listen "127.0.0.1:$port" \
            --redis "127.0.0.1:$REDIS_PORT" --history-size "$HISTORY" \
            --max-connections 20000 --heartbeat 30 --log-level warn \
            2>"$WORK/pushletd-$node.log" &
        NODE_PIDS+=($!)
        wait_port "$port" "${NODE_PIDS[-1]}" || { tail -20 "$WORK/pushletd-$node.log" >&2; return 1; }
    done
    A_PORT=$PORT_BASE; B_PORT=$((PORT_BASE + 1))
    SUB_PATH=/events; PUB_PATH=/publish; WS_PATH=/ws; WS_PROTOCOL=pushlet
}

start_nchan() {
    start_redis || return 1
    local node port dir
    for node in A B; do
        if [ "$node" = A ]; then port=$((PORT_BASE + 2)); else port=$((PORT_BASE + 3)); fi
        dir=$WORK/nginx-$node
        rm -rf "$dir"; mkdir -p "$dir"; chmod 755 "$dir"
        sed -e "s#@NCHAN_MODULE@#$NCHAN_SO#" -e "s#@DIR@#$dir#g" \
            -e "s#@LISTEN@#127.0.0.1:$port#" -e "s#@REDIS_URL@#redis://127.0.0.1:$REDIS_PORT#" \
            -e "s#@HISTORY@#$HISTORY#" \
            -e "s#@USER@#$(id -un)#" -e "s#@GROUP@#$(id -gn)#" \
            "$ROOT/bench/nchan-redis.conf.in" > "$dir/nginx.conf"
        "${SERVER_CPU[@]}" nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log" \
            2>"$WORK/nginx-$node.stderr" &
        NODE_PIDS+=($!)
        wait_port "$port" "${NODE_PIDS[-1]}" \
            || { tail -20 "$dir/error.log" "$WORK/nginx-$node.stderr" >&2; return 1; }
        # the worker (the CPU we want to sample) is forked after the listen
        for _ in $(seq 1 50); do
            [ -n "$(cat "/proc/${NODE_PIDS[-1]}/task/${NODE_PIDS[-1]}/children" 2>/dev/null)" ] && break
            sleep 0.1
        done
    done
    A_PORT=$((PORT_BASE + 2)); B_PORT=$((PORT_BASE + 3))
    SUB_PATH=/sub; PUB_PATH=/pub; WS_PATH=/sub; WS_PROTOCOL=raw
}

cpu_ticks() { # pid... -> utime+stime summed (clock ticks)
    local p s=0 f
    for p in "$@"; do
        f=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        f=${f##*) }
        # fields after "comm": state=1 ... utime=12 stime=13
        s=$((s + $(awk '{ print $12 + $13 }' <<<"$f")))
    done
    echo "$s"
}

# ---------------------------------------------------------------- scenarios
# name|title|subscribers|topics|messages|rate|duration|timeout|transports|extra client flags
P_SUBS=$(( SUBS < 100 ? SUBS : 100 ))
SCENARIOS=(
    "r|$SUBS subscribers on B, 1 topic, $RATE msg/s published on A for $SECONDS_R s|$SUBS|1|$((RATE * SECONDS_R))|$RATE|0|$((SECONDS_R + 30))|sse,ws|"
    "f|$SUBS subscribers on B, 1 topic, flat out on A for $SECONDS_F s|$SUBS|1|100000000|0|$SECONDS_F|$((SECONDS_F + 60))|sse,ws|--pipeline 32 --window 1024"
    "p|Publish path: $P_SUBS subscribers on B on $P_SUBS topics (one each), flat out on A for $SECONDS_P s|$P_SUBS|$P_SUBS|100000000|0|$SECONDS_P|$((SECONDS_P + 30))|sse|--pipeline 32 --window 1024"
)

FAILED=0

run_one() { # target transport scenario-line run
    local target=$1 tr=$2 line=$3 run=$4 name title subs topics msgs rate dur tmo trs extra
    IFS='|' read -r name title subs topics msgs rate dur tmo trs extra <<<"$line"
    [[ ",$trs," == *",$tr,"* ]] || return 0
    [ "$tr" = ws ] && name=$name-ws
    if [ -n "$ONLY_SCENARIOS" ] && [[ ",$ONLY_SCENARIOS," != *",$name,"* ]]; then return 0; fi
    wait_quiet
    echo ">> $target: ($name) $title over $tr [run $run/$REPEAT]" >&2
    rm -rf "$WORK"/pushletd-*.log "$WORK"/nginx-* "$WORK/redis.log"
    if ! "start_$target"; then
        echo "distributed.sh: $target cluster failed to start" >&2
        FAILED=1; stop_cluster; return
    fi
    # B first: the client takes the first PID's CPU as the server core.
    local b_pids a_pids pids=() p
    mapfile -t b_pids < <(server_pids "${NODE_PIDS[1]}")
    mapfile -t a_pids < <(server_pids "${NODE_PIDS[0]}")
    for p in "${b_pids[@]}" "${a_pids[@]}" "$REDIS_PID"; do pids+=(--pid "$p"); done
    local sub_path=$SUB_PATH ws=()
    if [ "$tr" = ws ]; then sub_path=$WS_PATH; ws=(--transport ws --ws-protocol "$WS_PROTOCOL"); fi
    local ca0 cb0 cr0 ca1 cb1 cr1 rc=0 json
    ca0=$(cpu_ticks "${a_pids[@]}"); cb0=$(cpu_ticks "${b_pids[@]}"); cr0=$(cpu_ticks "$REDIS_PID")
    # shellcheck disable=SC2086
    timeout -k 5 $((tmo + 30)) "${CLIENT_CPU[@]}" "$PUSHLET_BENCH" \
        --scenario "$name" --target "$target" --port "$B_PORT" --pub-port "$A_PORT" \
        --sub-path "$sub_path" --pub-path "$PUB_PATH" "${ws[@]}" \
        --subscribers "$subs" --topics "$topics" --messages "$msgs" \
        --rate "$rate" --duration "$dur" --timeout "$tmo" "${pids[@]}" $extra \
        > "$WORK/client.json" 2> "$WORK/client.err" &
    CLIENT_PID=$!
    wait "$CLIENT_PID" || rc=$?
    CLIENT_PID=""
    ca1=$(cpu_ticks "${a_pids[@]}"); cb1=$(cpu_ticks "${b_pids[@]}"); cr1=$(cpu_ticks "$REDIS_PID")
    # Commands Redis ran in the whole run (warm-up included): the cost of
    # the Redis hop per message, and proof that the messages went through it.
    local rcmds=-1
    if command -v redis-cli >/dev/null; then
        rcmds=$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO stats 2>/dev/null \
            | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p')
        rcmds=${rcmds:--1}
    fi
    json=$(cat "$WORK/client.json")
    for p in "${NODE_PIDS[@]}" "$REDIS_PID"; do
        if ! kill -0 "$p" 2>/dev/null; then
            echo "distributed.sh: $target: process $p died during ($name)" >&2
            rc=99
        fi
    done
    if [ "$rc" != 0 ]; then
        sed 's/^/    client: /' "$WORK/client.err" | tail -12 >&2
        for f in "$WORK"/pushletd-*.log "$WORK"/nginx-*/error.log; do
            [ -s "$f" ] && { echo "    --- $f" >&2; tail -5 "$f" >&2; }
        done
    fi
    stop_cluster
    [ -n "$json" ] || json="{\"scenario\":\"$name\",\"target\":\"$target\",\"status\":\"no-result\"}"
    local tck
    tck=$(getconf CLK_TCK)
    json="${json%\}},\"cpu_a_s\":$(awk -v a="$ca0" -v b="$ca1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')"
    json+=",\"cpu_b_s\":$(awk -v a="$cb0" -v b="$cb1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')"
    json+=",\"cpu_redis_s\":$(awk -v a="$cr0" -v b="$cr1" -v t="$tck" 'BEGIN{printf "%.2f", (b-a)/t}')"
    json+=",\"redis_commands\":$rcmds,\"run\":$run,\"exit\":$rc}"
    echo "$json" >> "$RESULTS"
    echo "   $(grep -E '^   (deliveries|latency)' "$WORK/client.err" | tr -s ' ' | paste -sd';' -)" >&2
    if [ "$rc" != 0 ]; then
        echo "distributed.sh: $target ($name): client exit $rc" >&2
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
# Other work on the machine (builds, tests) shows up as latency spikes: before
# each run, wait up to 20 s for the CPUs to go quiet (<= 5 % busy), spending at
# most DIST_IDLE_WAIT s on waiting in all.  The "other work" rows of the
# report show what was left.
IDLE_BUDGET=${DIST_IDLE_WAIT:-60}
case "$IDLE_BUDGET" in ''|*[!0-9]*) die "DIST_IDLE_WAIT must be a number of seconds" ;; esac
IDLE_BUDGET_START=$IDLE_BUDGET
wait_quiet() {
    local waited=0
    while [ "$IDLE_BUDGET" -gt 0 ] && [ "$waited" -lt 20 ]; do
        [ "$(cpu_busy_pct)" -le 5 ] && return 0
        waited=$((waited + 1)); IDLE_BUDGET=$((IDLE_BUDGET - 1))
    done
    return 0
}

T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for tr in "${TRANSPORT_LIST[@]}"; do
    for s in "${SCENARIOS[@]}"; do
        for r in $(seq 1 "$REPEAT"); do
            for t in $TARGETS; do run_one "$t" "$tr" "$s" "$r"; done
        done
    done
done
ELAPSED=$(( $(date +%s) - T0 ))

# ------------------------------------------------------------------- report
jget() { sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" <<<"$1"; }

result() { # scenario target -> JSON line of the median run (by p99, or by deliveries/s for f)
    local key=lat_p99_us lines
    case "$1" in f|f-ws|p|p-ws) key=deliveries_per_s ;; esac
    lines=$(grep "\"scenario\":\"$1\",\"target\":\"$2\"" "$RESULTS" || true)
    [ -n "$lines" ] || return 0
    while read -r l; do printf '%s\t%s\n' "$(jget "$l" "$key")" "$l"; done <<<"$lines" \
        | sort -g | awk -F'\t' '{ a[NR] = $2 } END { print a[int((NR + 1) / 2)] }'
}

fmt() {
    local v=${1:-}
    [ -n "$v" ] || { echo "-"; return; }
    awk -v v="$v" 'BEGIN { if (v < 0) { print "-"; exit }
        if (v >= 1e6) printf "%.2fM", v / 1e6;
        else if (v >= 1e4) printf "%.1fk", v / 1e3;
        else if (v >= 100 || v == int(v)) printf "%.0f", v;
        else printf "%.2f", v }'
}
ms() { [ -n "${1:-}" ] && awk -v v="$1" 'BEGIN{printf "%.2f", v/1000}' || echo "-"; }
ratio() { awk -v a="${1:-}" -v b="${2:-}" 'BEGIN {
    if (a == "" || b == "" || a + 0 < 0 || b + 0 <= 0) { print "-"; exit }
    r = a / b; printf(r < 0.1 ? "%.3f" : "%.2f", r) }'; }
other_work() { # json -> "x / y" percent of the cores used by other processes
    [ -n "$1" ] || { echo "-"; return; }
    awk -v a="$(jget "$1" server_core_other_util)" -v b="$(jget "$1" client_core_other_util)" \
        'BEGIN { if (a == "" || a < 0) print "-"; else printf "%.0f / %.0f", a * 100, b * 100 }'
}
cmds_per_msg() { # json -> Redis commands / (published + warm-up rounds)
    [ -n "$1" ] || { echo "-"; return; }
    awk -v c="$(jget "$1" redis_commands)" -v m="$(jget "$1" published)" -v w="$(jget "$1" warmup_rounds)" \
        'BEGIN { if (c == "" || c < 0 || m + w <= 0) print "-"; else printf "%.1f", c / (m + w) }'
}
checks() { # json -> "lost / dup / reordered / diverged / status"
    [ -n "$1" ] || { echo "-"; return; }
    echo "$(jget "$1" lost) / $(jget "$1" duplicated) / $(jget "$1" reordered) / $(jget "$1" order_diverged) / $(jget "$1" status)"
}

main_table() {
    local tr s name p n suffix
    echo "| scenario | metric | pushlet | nchan | pushlet / nchan |"
    echo "|---|---|---:|---:|---:|"
    for tr in "${TRANSPORT_LIST[@]}"; do
        suffix=""; [ "$tr" = ws ] && suffix=-ws
        for s in "${SCENARIOS[@]}"; do
            name=${s%%|*}$suffix
            p=$(result "$name" pushlet); n=$(result "$name" nchan)
            [ -n "$p$n" ] || continue
            local pd nd
            pd=$(jget "$p" deliveries_per_s); nd=$(jget "$n" deliveries_per_s)
            echo "| ($name) | deliveries/s | $(fmt "$pd") | $(fmt "$nd") | $(ratio "$pd" "$nd") |"
            pd=$(jget "$p" publish_per_s); nd=$(jget "$n" publish_per_s)
            echo "| ($name) | messages published/s | $(fmt "$pd") | $(fmt "$nd") | $(ratio "$pd" "$nd") |"
            for k in lat_p50_us:p50 lat_p99_us:p99 lat_max_us:max; do
                pd=$(jget "$p" "${k%%:*}"); nd=$(jget "$n" "${k%%:*}")
                echo "| ($name) | latency ${k##*:}, ms | $(ms "$pd") | $(ms "$nd") | $(ratio "$pd" "$nd") |"
            done
            pd=$(jget "$p" server_total_ns_per_delivery); nd=$(jget "$n" server_total_ns_per_delivery)
            echo "| ($name) | cluster CPU per delivery (A+B+Redis, + softirq), ns | $(fmt "$pd") | $(fmt "$nd") | $(ratio "$pd" "$nd") |"
            echo "| ($name) | CPU s, whole run: A / B / Redis | $(jget "$p" cpu_a_s) / $(jget "$p" cpu_b_s) / $(jget "$p" cpu_redis_s) | $(jget "$n" cpu_a_s) / $(jget "$n" cpu_b_s) / $(jget "$n" cpu_redis_s) | |"
            pd=$(jget "$p" client_core_util); nd=$(jget "$n" client_core_util)
            echo "| ($name) | server core / client core busy, % | $(awk -v a="$(jget "$p" server_core_util)" -v b="$pd" 'BEGIN{ if (a=="" || a<0) print "-"; else printf "%.0f / %.0f", a*100, b*100 }') | $(awk -v a="$(jget "$n" server_core_util)" -v b="$nd" 'BEGIN{ if (a=="" || a<0) print "-"; else printf "%.0f / %.0f", a*100, b*100 }') | |"
            pd=$(jget "$p" redis_commands); nd=$(jget "$n" redis_commands)
            echo "| ($name) | other work on the server / client core, % (noise) | $(other_work "$p") | $(other_work "$n") | |"
            echo "| ($name) | Redis commands per message (those run by Lua scripts included; whole run) | $(cmds_per_msg "$p") | $(cmds_per_msg "$n") | |"
            echo "| ($name) | deliveries checked | $(fmt "$(jget "$p" deliveries)") | $(fmt "$(jget "$n" deliveries)") | |"
            echo "| ($name) | lost / duplicated / reordered / order diverged / status | $(checks "$p") | $(checks "$n") | |"
        done
    done
}

report() {
    echo "<!-- distributed.sh:begin -->"
    echo "Generated by \`$CMDLINE\` on $(date -u '+%Y-%m-%d %H:%M UTC') (${ELAPSED} s, of which"
    echo "$((IDLE_BUDGET_START - IDLE_BUDGET)) s waiting for idle CPUs);"
    echo "pushlet commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown),"
    echo "$("$REDIS_SERVER" --version | awk '{print $1, $2, $3}' | sed 's/v=//'),"
    echo "$(nginx -v 2>&1 | sed 's/^nginx version: //') + nchan" \
         "$(dpkg-query -W -f='${Version}' libnginx-mod-nchan 2>/dev/null || echo '?');" \
         "$(nproc) cores, open-file limit $NOFILE; load average $LOAD_START before,"
    echo "$(cut -d' ' -f1-3 /proc/loadavg) after."
    echo
    echo '```'
    echo "PUSHLETD=$PUSHLETD PUSHLET_BENCH=$PUSHLET_BENCH $CMDLINE"
    echo '```'
    echo
    local s n title trs
    for s in "${SCENARIOS[@]}"; do
        IFS='|' read -r n title _ _ _ _ _ _ trs _ <<<"$s"
        grep -q "\"scenario\":\"$n\(-ws\)\{0,1\}\"" "$RESULTS" || continue
        if [[ ",$trs," == *",ws,"* ]]; then
            echo "- ($n) $title (\`$n-ws\`: the same over WebSocket)"
        else
            echo "- ($n) $title (SSE only)"
        fi
    done
    echo
    main_table
    echo
    echo "Each figure is the median of $REPEAT run(s) (by p99 for (r), by deliveries/s for (f) and (p))."
    echo "Ratios are pushlet ÷ nchan: above 1 is better for throughput, below 1 for latency and CPU."
    echo "In (f) and (p) the publishers run ahead of delivery, so their latency is mostly time spent"
    echo "queued behind the messages in flight: (f) up to the client's window of 1,024 messages not"
    echo "yet received by all, (p) up to the 4 x 32 pipelined publishes; about that number ÷"
    echo "messages published/s (Little's law). (r) is the latency figure."
    echo
    echo "<details><summary>Raw results (one JSON line per run)</summary>"
    echo
    echo '```'
    cat "$RESULTS"
    echo '```'
    echo
    echo "</details>"
    echo "<!-- distributed.sh:end -->"
}

REPORT=$WORK/report.md
report > "$REPORT"
if [ -n "$OUT" ]; then cp "$REPORT" "$OUT"; else cat "$REPORT"; fi

if [ "$UPDATE_DOC" = 1 ]; then
    DOC=$ROOT/docs/BENCHMARKS.md
    if grep -q '^<!-- distributed.sh:begin -->' "$DOC" && grep -q '^<!-- distributed.sh:end -->' "$DOC"; then
        awk -v rep="$REPORT" '
            /^<!-- distributed.sh:begin -->/ { while ((getline l < rep) > 0) print l; skip = 1; next }
            /^<!-- distributed.sh:end -->/ { skip = 0; next }
            !skip { print }' "$DOC" > "$DOC.tmp" && mv "$DOC.tmp" "$DOC"
        echo "distributed.sh: updated the generated block in $DOC" >&2
    else
        echo "distributed.sh: no distributed.sh markers in $DOC; not updated" >&2
    fi
fi

echo "distributed.sh: ${ELAPSED} s" >&2
while read -r j; do
    [ "$(jget "$j" target)" = pushlet ] || continue
    for k in lost duplicated reordered order_diverged; do
        v=$(jget "$j" "$k")
        if [ "${v:-x}" != 0 ]; then
            echo "distributed.sh: FAIL pushlet ($(jget "$j" scenario)): $k=${v:-missing}" >&2
            FAILED=1
        fi
    done
done < "$RESULTS"
if [ "$FAILED" != 0 ]; then echo "distributed.sh: FAILED" >&2; exit 1; fi
if [[ " $TARGETS " == *" pushlet "* ]]; then
    echo "distributed.sh: OK — pushlet lost, duplicated and reordered nothing across nodes" >&2
fi
