#!/bin/busybox sh
# PID 1 of every VM of the kernel matrix (sensor/tests/qemu/kernels.tsv): runs the sensor once
# per pass named on the kernel command line (`sensor.passes=fentry,kprobe`), causes in each a
# real memcg OOM kill, 20 connects that succeed, 5 refused and 3 that time out, and a host-wide
# OOM kill; in the first pass also a slow growth to its parent's limit (a `growth` kill in a
# child without a limit of its own: the `ancestor`'s limit fired). Prints what the
# sensor reported between markers on the serial console, then `sensor doctor`, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
ip link set lo up
# Connects to 10.99.0.2 leave through lo with source 127.0.0.1 and are dropped on the way in
# (a loopback source on a routed packet is martian): the SYN is never answered.
ip route add 10.99.0.2/32 dev lo

M=http://127.0.0.1:9442/metrics
echo "=== KERNEL $(uname -r) ==="

# A memory cgroup limited to 32 MiB, with the current shell's child moved into it by `$2`.
limited() {
  cg=/sys/fs/cgroup/$1
  mkdir $cg
  echo 33554432 > $cg/memory.max
  echo 0 > $cg/memory.swap.max 2>/dev/null
}

# Every TCP series of the root cgroup (wget, nc and the sensor's own scrapes run there).
tcp_root() {
  wget -q -O - $M | grep -E '^sensor_tcp_connect(s_total|_duration_seconds_(count|sum))\{.*cgroup="/"'
}

pass() {
  name=$1; first=$2; shift 2
  echo "=== PASS $name ==="
  /sensor run --listen 127.0.0.1:9442 --probes.memcg.discovery-interval 500ms --probes.oom.history.interval 1s --journal.path /tmp/journal-$name "$@" > /tmp/sensor-$name.log 2>&1 &
  spid=$!
  i=0
  until wget -q -O /dev/null http://127.0.0.1:9442/readyz; do
    i=$((i+1)); [ $i -gt 240 ] && { echo "--- not ready"; cat /tmp/sensor-$name.log; return; }
    sleep 0.5
  done
  limited victim-$name
  sh -c "echo \$\$ > $cg/cgroup.procs; exec /tail /dev/zero"
  echo "--- victim exit $?"
  sleep 3
  echo "--- probes"; wget -q -O - http://127.0.0.1:9442/api/v1/probes; echo
  echo "--- events"; wget -q -O - http://127.0.0.1:9442/api/v1/events; echo
  echo "--- metrics"; wget -q -O - $M | grep -E '^sensor_(oom|events|probe|memcg_events|memory_pressure)'
  echo "--- kernel"; grep oom_kill $cg/memory.events.local
  echo "--- memory.events"; cat $cg/memory.events
  # Connects between two scrapes (each scrape being one more success): 20 that succeed, 5
  # refused (nothing listens on port 1), 3 given up after 2 s in SYN_SENT (a timeout).
  echo "--- tcp before"; tcp_root
  i=0; while [ $i -lt 20 ]; do wget -q -O /dev/null http://127.0.0.1:9442/healthz; i=$((i+1)); done
  i=0; while [ $i -lt 5 ]; do nc 127.0.0.1 1 < /dev/null 2>/dev/null; i=$((i+1)); done
  t=""; for i in 1 2 3; do timeout 2 nc 10.99.0.2 80 < /dev/null 2>/dev/null & t="$t $!"; done; wait $t
  echo "--- tcp after"; tcp_root
  if [ "$first" = 1 ]; then
    # 2 MiB a second into a 32 MiB limit: about 16 s of steady growth, then the kill. The
    # grower runs in a child without a limit: its parent's limit fires.
    limited grower-$name
    echo +memory > $cg/cgroup.subtree_control
    mkdir $cg/job
    sleep 1
    # Only the allocator (awk) is in the cgroup, so the limit has exactly one task to kill: with
    # its feeding loop inside too, a slow reap under a loaded emulator let a second OOM kill
    # the loop (oom_kill 2, seen in CI).
    while echo; do sleep 0.125; done | sh -c "echo \$\$ > $cg/job/cgroup.procs; exec awk '{ a[NR] = sprintf(\"%262144s\", \"\") }'"
    sleep 3
    echo "--- growth kernel"; grep oom_kill $cg/job/memory.events.local
    echo "--- growth events"; wget -q -O - http://127.0.0.1:9442/api/v1/events; echo
  fi
  # The host runs out: an allocator without a memory limit, the sensor protected from the
  # OOM killer; the kill must be counted as global with the verdict "host".
  echo -1000 > /proc/$spid/oom_score_adj
  echo "--- host victim"   # the shell's "Killed" lands here
  sh -c "exec /tail /dev/zero"
  echo "--- host victim exit $?"
  sleep 3
  echo "--- host events"; wget -q -O - http://127.0.0.1:9442/api/v1/events; echo
  echo "--- host metrics"; wget -q -O - $M | grep -E '^sensor_oom_kills_total'
  kill -TERM $spid; wait $spid; echo "--- sensor exit $?"
  echo "--- log"; cat /tmp/sensor-$name.log
  echo "=== END $name ==="
}

# The TCP probe's overhead (tests/qemu.rs, tcp_overhead_*): loopback connect rounds of 2 s
# without the sensor, with it, and without it again (starting it takes long under emulation, so
# the baseline brackets the sensor's rounds instead of alternating with them); one warm-up.
bench() {
  loop() { SENSOR_LOOP_SECONDS=2 /qemu-tests --ignored --exact connect_loop_helper --nocapture --test-threads=1 | sed -n 's/.*RATE \([0-9.]*\).*/\1/p'; }
  echo "=== PASS bench ==="
  loop > /dev/null
  for i in 1 2 3 4; do echo "--- rate base $i $(loop)"; done
  /sensor run --listen 127.0.0.1:9442 --journal.enabled false > /tmp/sensor-bench.log 2>&1 &
  spid=$!
  until wget -q -O /dev/null http://127.0.0.1:9442/readyz; do sleep 0.5; done
  sleep 2
  for i in 1 2 3 4 5; do echo "--- rate sensor $i $(loop)"; done
  echo "--- probes"; wget -q -O - http://127.0.0.1:9442/api/v1/probes; echo
  kill -TERM $spid; wait $spid
  for i in 5 6 7 8; do echo "--- rate base $i $(loop)"; done
  echo "=== END bench ==="
}

# A probe without its required part (the OOM probe with its tracepoint excluded): it must attach
# nothing, and its state, metrics and report say so. Run next to doctor (both mostly load
# programs, on a CPU each).
split() {
  /sensor run --listen 127.0.0.1:9443 --probes.oom.exclude-hooks tracepoint --journal.enabled false > /tmp/sensor-split.log 2>&1 &
  xpid=$!
  until wget -q -O /dev/null http://127.0.0.1:9443/readyz; do sleep 0.5; done
  echo "=== PASS split ==="
  echo "--- probes"; wget -q -O - http://127.0.0.1:9443/api/v1/probes; echo
  echo "--- metrics"; wget -q -O - http://127.0.0.1:9443/metrics | grep -E '^sensor_probe'
  kill -TERM $xpid; wait $xpid; echo "--- sensor exit $?"
  echo "=== END split ==="
}

passes=$(sed -n 's/.*sensor\.passes=\([^ ]*\).*/\1/p' /proc/cmdline)
first=1
for p in $(echo "$passes" | tr , ' '); do
  case $p in
    kprobe) pass kprobe $first --probes.oom.exclude-hooks fentry --probes.tcp.exclude-hooks raw_tracepoint ;;
    # Without the kill context: scope from the stack, the limit that fired from the counters.
    counters) pass counters $first --probes.oom.exclude-hooks fentry,kprobe ;;
    bench) bench ;;
    split) with_split=1 ;;
    *) pass $p $first ;;
  esac
  first=0
done
# Once, in its human form (each run loads every program again: seconds under emulation).
if [ -n "$with_split" ]; then split > /tmp/split.txt 2>&1 & xs=$!; fi
if [ "$passes" != bench ]; then
  /sensor doctor > /tmp/doctor.txt 2>&1
  echo "=== DOCTOR ==="; cat /tmp/doctor.txt; echo "=== END DOCTOR ==="
fi
if [ -n "$with_split" ]; then wait $xs; cat /tmp/split.txt; fi
poweroff -f
