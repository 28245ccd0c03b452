# Where a serving replica's threads spend gpu_serve's measured run: two py-spy profiles of one
# replica, taken from the end of the warm-up for 8 s (the 256-request run takes ~6 s), sampling
# without stopping the process: every thread with idle samples kept (a thread waiting for the
# GIL or for the GPU counts), and the GIL holder only.
# On the GPU machine:  bash bench/device_run.sh bash bench/gpu_pyspy.sh NAME ...
# NAME: a bench/gpu_token_path.sh name (pd, pd_mps, colo, ...); a pd* name profiles the decode
# replica, a colo* name the colocated one; NAME@ROLE profiles a replica of ROLE instead (e.g.
# colo@ingress: the first ingress replica). Needs .device/py-spy: the static binary that
# `pip install py-spy` puts in bin/. Writes $OUT/NAME_ROLE_idle.txt and $OUT/NAME_ROLE_gil.txt
# (py-spy's raw format: one `thread;frame;...;frame count` line per distinct stack).
set -u
for arg in "$@"; do
  name=${arg%@*}
  case $arg in *@*) role=${arg#*@} ;; colo*) role=colocated ;; *) role=decode ;; esac
  rm -f /tmp/r_$name/warmup.json
  (
    for _ in $(seq 3000); do [ -f /tmp/r_$name/warmup.json ] && break; sleep 0.1; done
    [ -f /tmp/r_$name/warmup.json ] || { echo "py-spy: no warm-up seen in 300 s"; exit 0; }
    pid=$(pgrep -f "ServeReplica:.*:$role" | head -1)
    echo "py-spy: $role replica pid $pid"
    for mode in idle gil; do
      .device/py-spy record --nonblocking --threads --$mode -r 200 -d 8 -f raw \
        -o "$OUT/${name}_${role}_$mode.txt" -p "$pid" > "/tmp/pyspy_$mode.log" 2>&1 &
    done
    wait
    tail -n 2 /tmp/pyspy_*.log
  ) &
  bash bench/gpu_token_path.sh "$name"
  wait
done
