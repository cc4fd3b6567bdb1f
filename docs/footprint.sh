#!/usr/bin/env bash
# Memory of the sensor daemon (issue 17), measured the way docs/footprint.md reports it.
#
#   docs/footprint.sh idle  [--binary PATH] [--seconds N] [-- sensor run flags...]
#   docs/footprint.sh churn [--binary PATH] [--workloads N] [--rounds R] [-- sensor run flags...]
#
# idle:  starts `sensor run` (embedded default config), samples VmRSS/VmHWM every 10 s for N s.
# churn: R rounds; each creates N real memory cgroups with one real process in each, which makes
#        one loopback connect (to the daemon's own port) and then sleeps; waits until the daemon
#        exports every one of them, scrapes /metrics, records RSS, then kills the processes and
#        removes the cgroups. Round R+1 creates N again and is the "after N*R created and
#        removed" figure. Use `-- --limits.vanished-grace 10s` to let the daemon drop the series
#        of removed cgroups within a round (the default grace is 15 minutes).
#
# Needs root. Loads BPF, so it holds the machine-wide lock /tmp/sensor-kernel-tests.lock for the
# whole run. Cgroups live under sensor-footprint-<pid> and are removed on exit. Prints the machine,
# kernel and commit first, then one line per sample.
set -euo pipefail

if [ -z "${SENSOR_FOOTPRINT_LOCKED:-}" ]; then
    SENSOR_FOOTPRINT_LOCKED=1 exec flock /tmp/sensor-kernel-tests.lock "$0" "$@"
fi

mode=${1:?usage: $0 idle|churn [options] [-- sensor run flags]}
shift
binary=target/release/sensor
seconds=600
workloads=1000
rounds=10
port=19442
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --workloads) workloads=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
extra=("$@")

echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "kernel:  $(uname -r)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
echo "binary:  $binary ($(file -b "$binary" | cut -d, -f1-2))"
echo "flags:   ${extra[*]:-(none)}"

if [ -d /sys/fs/cgroup/memory ]; then
    croot=/sys/fs/cgroup/memory
else
    croot=/sys/fs/cgroup
    grep -qw memory "$croot/cgroup.subtree_control" || echo +memory > "$croot/cgroup.subtree_control"
fi
parent=$croot/sensor-footprint-$$
mkdir "$parent"
[ -f "$parent/cgroup.subtree_control" ] && echo +memory > "$parent/cgroup.subtree_control"

log=$(mktemp /tmp/sensor-footprint-XXXX.log)
"$binary" run --listen "127.0.0.1:$port" "${extra[@]}" 2> "$log" &
daemon=$!
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    wait "${pids[@]}" 2> /dev/null || true
    kill -INT "$daemon" 2> /dev/null || true
    wait "$daemon" 2> /dev/null || true
    for d in "$parent"/wl-*; do [ -d "$d" ] && rmdir "$d" 2> /dev/null || true; done
    rmdir "$parent" 2> /dev/null || true
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$daemon/status"; }
mb() { awk -v v="$1" 'BEGIN {printf "%.1f", v / 1024}'; }
sample() {
    local t=$1 note=$2 metrics series
    metrics=$(curl -sf "http://127.0.0.1:$port/metrics" || true)
    series=$(grep -vc '^#' <<< "$metrics" || true)
    printf '%-8s rss_mb=%s hwm_mb=%s anon_mb=%s file_mb=%s threads=%s series=%s scrape_kb=%s %s\n' \
        "$t" "$(mb "$(status VmRSS)")" "$(mb "$(status VmHWM)")" "$(mb "$(status RssAnon)")" \
        "$(mb "$(status RssFile)")" "$(status Threads)" "$series" "$(( ${#metrics} / 1024 ))" "$note"
}

for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
    kill -0 "$daemon" 2> /dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.2
done
sample start "ready"

if [ "$mode" = idle ]; then
    for ((s = 10; s <= seconds; s += 10)); do
        sleep 10
        sample "${s}s" ""
    done
    exit 0
fi

rel=${parent#"$croot"}
for ((r = 1; r <= rounds + 1; r++)); do
    pids=()
    for ((i = 0; i < workloads; i++)); do
        d=$parent/wl-$r-$i
        mkdir "$d"
        (
            echo "$BASHPID" > "$d/cgroup.procs"
            exec 3<> "/dev/tcp/127.0.0.1/$port"
            exec 3>&-
            exec sleep 100000
        ) &
        pids+=($!)
    done
    # Every workload exported (its connect counted under its own cgroup label), or as many as
    # `limits.workloads_per_metric` leaves room for next to the host's other cgroups: the count
    # stopped growing for 5 polls after the daemon's discovery interval.
    n=0 same=0
    for _ in $(seq 1 120); do
        sleep 1
        m=$(curl -sf "http://127.0.0.1:$port/metrics" | grep '^sensor_tcp_connects_total' |
            grep -c "cgroup=\"$rel/wl-$r-" || true)
        if [ "$m" -eq "$n" ] && [ "$n" -gt 0 ]; then same=$((same + 1)); else same=0; fi
        n=$m
        [ "$n" -ge "$workloads" ] || [ "$same" -ge 5 ] && break
    done
    one=$(curl -sf "http://127.0.0.1:$port/metrics" | grep -c "cgroup=\"$rel/wl-$r-0\"" || true)
    sample "round$r" "live=$workloads exported=$n series_of_one_workload=$one created_before=$(( (r - 1) * workloads ))"
    [ "$r" -gt "$rounds" ] && break
    kill "${pids[@]}" 2> /dev/null || true
    wait "${pids[@]}" 2> /dev/null || true
    for ((i = 0; i < workloads; i++)); do rmdir "$parent/wl-$r-$i"; done
done
