#!/bin/busybox sh
# PID 1 of the test VM (Debian's 6.1 kernel, which has kprobes and fentry): runs the sensor
# once per OOM context hook (the second time also on the TCP probe's classic-tracepoint entry),
# causes one real memcg OOM kill, 20 connects and one host-wide OOM kill each time, prints what
# the sensor reported
# between markers on the serial console, and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo +memory > /sys/fs/cgroup/cgroup.subtree_control
ip link set lo up

pass() {
  name=$1; shift
  echo "=== PASS $name ==="
  /sensor run --listen 127.0.0.1:9442 --probes.memcg.discovery-interval 500ms --journal.path /tmp/journal-$name "$@" > /tmp/sensor-$name.log 2>&1 &
  spid=$!
  i=0
  until wget -q -O /dev/null http://127.0.0.1:9442/readyz; do
    i=$((i+1)); [ $i -gt 240 ] && { echo "--- not ready"; cat /tmp/sensor-$name.log; return; }
    sleep 0.5
  done
  cg=/sys/fs/cgroup/victim-$name
  mkdir $cg
  echo 33554432 > $cg/memory.max
  echo 0 > $cg/memory.swap.max 2>/dev/null
  sh -c "echo \$\$ > $cg/cgroup.procs; exec /tail /dev/zero"
  echo "--- victim exit $?"
  sleep 5
  echo "--- probes"; wget -q -O - http://127.0.0.1:9442/api/v1/probes; echo
  echo "--- events"; wget -q -O - http://127.0.0.1:9442/api/v1/events; echo
  echo "--- metrics"; wget -q -O - http://127.0.0.1:9442/metrics | grep -E '^sensor_(oom|events|probe|memcg_events|memory_pressure)'
  # 20 connects from wget (root cgroup) between two scrapes, each scrape being one more.
  tcp='^sensor_tcp_connect_duration_seconds_count{destination="other",cgroup="/"'
  echo "--- tcp before"; wget -q -O - http://127.0.0.1:9442/metrics | grep "$tcp"
  i=0; while [ $i -lt 20 ]; do wget -q -O /dev/null http://127.0.0.1:9442/healthz; i=$((i+1)); done
  echo "--- tcp after"; wget -q -O - http://127.0.0.1:9442/metrics | grep "$tcp"
  echo "--- kernel"; grep oom_kill $cg/memory.events.local
  echo "--- memory.events"; cat $cg/memory.events
  # The host runs out: an allocator without a memory limit, the sensor protected from the
  # OOM killer; the kill must be counted as global with the verdict "host".
  echo -1000 > /proc/$spid/oom_score_adj
  echo "--- host victim"   # the shell's "Killed" lands here
  sh -c "exec /tail /dev/zero"
  echo "--- host victim exit $?"
  sleep 5
  echo "--- host events"; wget -q -O - http://127.0.0.1:9442/api/v1/events; echo
  echo "--- host metrics"; wget -q -O - http://127.0.0.1:9442/metrics | grep -E '^sensor_oom_kills_total'
  kill -TERM $spid; wait $spid; echo "--- sensor exit $?"
  echo "--- log"; cat /tmp/sensor-$name.log
  echo "=== END $name ==="
}

pass fentry
pass kprobe --probes.oom.exclude-hooks fentry --probes.tcp.exclude-hooks raw_tracepoint
echo "=== DOCTOR ==="
/sensor doctor 2>&1
echo "=== END DOCTOR ==="
poweroff -f
