#!/usr/bin/env bash
# with-ray.sh NAME LOG COMMAND...: run COMMAND on this node for exactly as long as Ray does.
#
# The cluster files start the head's MLflow server with it, right after `ray start --head`.
# Nothing in Ray's cluster launcher runs at teardown (`ray down` only runs `ray stop` on the
# head), so a server started by the start commands would otherwise outlive the cluster. Here
# COMMAND runs in its own session, in the background, and is stopped (TERM, KILL after 10 s,
# its whole process group) as soon as this node's Ray GCS server exits: `ray stop`, `ray down`,
# or a `ray up` that restarts Ray. A COMMAND started earlier under the same NAME is stopped
# first, so running the start commands again never finds the port taken. COMMAND's output
# goes to LOG.
set -euo pipefail
name=$1 log=$2
shift 2
state=~/.bake-ray-services
pidfile=$state/$name.pid

if [ "${BAKE_RAY_WITH_RAY_GCS_PID:-}" = "" ]; then
  mkdir -p "$state" "$(dirname "$log")"
  # The previous instance, if its session leader is still this script.
  if old=$(cat "$pidfile" 2>/dev/null) && grep -qa with-ray "/proc/$old/cmdline" 2>/dev/null; then
    kill -TERM -- "-$old" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 -- "-$old" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$old" 2>/dev/null || true
  fi
  gcs=0  # this user's newest GCS server (plain /proc: no procps needed, e.g. in a container)
  for proc in /proc/[0-9]*; do
    if [ -O "$proc" ] && [ "$(cat "$proc/comm" 2>/dev/null)" = gcs_server ] &&
      [ "${proc#/proc/}" -gt "$gcs" ]; then
      gcs=${proc#/proc/}
    fi
  done
  if [ "$gcs" = 0 ]; then
    echo "with-ray.sh: Ray's GCS server is not running here: start Ray first" >&2
    exit 1
  fi
  BAKE_RAY_WITH_RAY_GCS_PID=$gcs setsid bash "$0" "$name" "$log" "$@" </dev/null >>"$log" 2>&1 &
  exit 0
fi

# In our own session from here on: $$ is the session and process group id.
echo $$ >"$pidfile"
"$@" &
main=$!
trap '' TERM
tail --pid="$BAKE_RAY_WITH_RAY_GCS_PID" -f /dev/null
echo "with-ray.sh: Ray stopped on this node (GCS server $BAKE_RAY_WITH_RAY_GCS_PID exited): stopping $name"
kill -TERM -- "-$$" 2>/dev/null || true
(sleep 10 && kill -KILL -- "-$$") &
wait "$main" || true
rm -f "$pidfile"
kill -KILL -- "-$$"
