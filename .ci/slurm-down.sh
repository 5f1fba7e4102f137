#!/usr/bin/env bash
# Stop the cluster that .ci/slurm-up.sh started in STATE_DIR: cancel its leftover jobs, then stop
# exactly the daemons whose pids it recorded (slurmd -N n1, slurmd -N n2, slurmctld, munged), with SIGTERM
# and SIGKILL after 10 s. Deletes nothing (the logs stay for inspection).
#
#   .ci/slurm-down.sh STATE_DIR
set -uo pipefail

DIR=${1:?usage: slurm-down.sh STATE_DIR}
case $DIR in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
export SLURM_CONF=$DIR/etc/slurm.conf
log() { echo "[slurm-down] $*" >&2; }
[ -d "$DIR/run" ] || { log "no $DIR/run: nothing to stop"; exit 0; }

alive() {  # alive NAME: prints the recorded pid if it still runs that program (slurmd-n1: slurmd)
  local f=$DIR/run/$1.started pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%-*}" ] && echo "$pid"
}

# Leftover jobs first, while the controller answers: slurmd SIGTERMs (then SIGKILLs) their processes.
if alive slurmctld >/dev/null && alive slurmd-n1 >/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 60); do
      [ -z "$(squeue -h -t RUNNING,COMPLETING,PENDING,CONFIGURING -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

# Clients first: both slurm daemons need munged to the end.
for name in slurmd-n1 slurmd-n2 slurmctld munged; do
  pid=$(alive "$name") || { rm -f "$DIR/run/$name.started"; continue; }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then
    log "$name (pid $pid) still alive after 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/run/$name.started"
done
log "stopped"
