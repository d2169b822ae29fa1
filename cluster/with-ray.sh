#!/usr/bin/env bash
# with-ray.sh NAME LOG [--follow HOST:PORT] [--then CMD] COMMAND...
#     run COMMAND for exactly as long as Ray runs here (or as long as HOST:PORT answers)
# with-ray.sh --stop NAME
#     stop the one started under NAME, if any
#
# Nothing in Ray's cluster launcher runs at teardown: `ray down` only runs `ray stop` on the
# head. So the cluster files start, after `ray start`, what must end with Ray through this:
# COMMAND runs in the background in its own session, and as soon as Ray's process on this
# node exits (the GCS server on the head, else the raylet) COMMAND's whole process group is
# stopped (TERM, KILL after 10 s) and then CMD, if given, runs. With --follow, the end is
# instead HOST:PORT refusing TCP connections three times in a row, 10 s apart: on a worker,
# the head's GCS server gone. The head's MLflow server runs this way; on workers,
# `--follow $RAY_HEAD_IP:6379 --then "ray stop"` stops Ray once the head has stopped (a
# worker's raylet outlives the head for minutes, its log monitor for ever). A COMMAND started
# earlier under the same NAME is stopped first, so running the start commands again never
# finds a port taken. Output goes to LOG.
set -euo pipefail
state=~/.bake-ray-services

stop_previous() {  # the previous instance, if its session leader is still this script
  local old
  if old=$(cat "$state/$1.pid" 2>/dev/null) && grep -qa with-ray "/proc/$old/cmdline" 2>/dev/null
  then
    kill -TERM -- "-$old" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 -- "-$old" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$old" 2>/dev/null || true
  fi
  rm -f "$state/$1.pid"
}

newest_own() {  # pid of this user's newest process named $1 (plain /proc: no procps needed)
  local proc pid=0
  for proc in /proc/[0-9]*; do
    if [ -O "$proc" ] && [ "$(cat "$proc/comm" 2>/dev/null)" = "$1" ] &&
      [ "${proc#/proc/}" -gt "$pid" ]; then
      pid=${proc#/proc/}
    fi
  done
  echo "$pid"
}

if [ "$1" = --stop ]; then
  stop_previous "$2"
  exit 0
fi

name=$1 log=$2
shift 2
follow="" then_cmd=""
while [ "${1:-}" = --follow ] || [ "${1:-}" = --then ]; do
  if [ "$1" = --follow ]; then follow=$2; else then_cmd=$2; fi
  shift 2
done

if [ "${BAKE_RAY_WITH_RAY_PID:-}" = "" ]; then
  mkdir -p "$state" "$(dirname "$log")"
  stop_previous "$name"
  ray_pid=$(newest_own gcs_server)
  [ "$ray_pid" != 0 ] || ray_pid=$(newest_own raylet)
  if [ "$ray_pid" = 0 ]; then
    echo "with-ray.sh: Ray is not running here: start Ray first" >&2
    exit 1
  fi
  BAKE_RAY_WITH_RAY_PID=$ray_pid setsid bash "$0" "$name" "$log" --follow "$follow" \
    --then "$then_cmd" "$@" </dev/null >>"$log" 2>&1 &
  exit 0
fi

follow_tcp() {  # returns once $1 (HOST:PORT) has refused 3 times in a row, 10 s apart
  local misses=0
  while [ "$misses" -lt 3 ]; do
    if timeout 5 bash -c "exec 3<>/dev/tcp/${1%:*}/${1##*:}" 2>/dev/null; then
      misses=0
    else
      misses=$((misses + 1))
    fi
    sleep 10
  done
}

# In our own session from here on: $$ is the session and process group id.
echo $$ >"$state/$name.pid"
stopping=""
trap 'stopping=1' TERM  # a handler, not "ignore": COMMAND keeps the default TERM
"$@" &
main=$!
if [ -n "$follow" ]; then
  follow_tcp "$follow" &
  why="$follow stopped answering"
else
  tail --pid="$BAKE_RAY_WITH_RAY_PID" -f /dev/null &
  why="Ray stopped on this node (process $BAKE_RAY_WITH_RAY_PID exited)"
fi
wait $! || true  # until then, or a TERM (--stop, or a new instance)
[ -z "$stopping" ] || why="asked to stop"
echo "with-ray.sh: $why: stopping $name"
trap '' TERM
kill -TERM -- "-$$" 2>/dev/null || true
(sleep 10 && kill -KILL -- "-$$") &
killer=$!
wait "$main" || true
if [ -z "$stopping" ] && [ -n "$then_cmd" ]; then
  kill "$killer" 2>/dev/null || true
  echo "with-ray.sh: running: $then_cmd"
  timeout 300 bash -c "$then_cmd" || echo "with-ray.sh: '$then_cmd' failed"
fi
rm -f "$state/$name.pid"
kill -KILL -- "-$$"
