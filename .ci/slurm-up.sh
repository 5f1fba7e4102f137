#!/usr/bin/env bash
# Bring up a two-node SLURM cluster on this machine (Debian/Ubuntu, as root), for CI's SLURM tests:
# two slurmd daemons, `slurmd -N n1` and `slurmd -N n2`, on loopback (both at NodeAddr 127.0.0.1,
# each on a port of its own: a slurmd binds its NodeHostname's address, localhost, whatever its
# NodeAddr says). The names n1/n2 are in no /etc/hosts: SLURM reaches the nodes by their NodeAddr,
# and so must our scripts' rendezvous.
#
#   .ci/slurm-up.sh STATE_DIR        # prints: export SLURM_CONF=STATE_DIR/etc/slurm.conf
#   .ci/slurm-down.sh STATE_DIR      # stops exactly the daemons this script started
#   .ci/with-slurm.sh CMD...         # both around a command, in a new temporary STATE_DIR
#
# Installs slurm-wlm and munge with apt-get if they are missing. Everything (slurm.conf, a munge
# key and socket of its own, state, spool, logs, pids) lives under STATE_DIR; /etc is not touched
# (except an /etc/hosts line when the short hostname does not resolve). One partition, `cpu`, with
# this machine's CPUs and no GPU. Partitions: `cpu` (n1 only, the default: one-node jobs always land
# on n1) and `two` (n1 and n2, for two-node jobs). No accounting (no slurmdbd): `sacct` does not work, use
# `squeue`/`scontrol show job`. Idempotent: daemons it started earlier that still run are kept.
# Log lines go to stderr, the export line to stdout.
#
# Settings (environment): DT_SLURM_MINJOBAGE (300: how long finished jobs stay visible to
# scontrol/squeue; the tests read final states after other jobs ran), DT_SLURM_KILLWAIT (5: SIGTERM
# -> SIGKILL), DT_SLURM_CTLD_PORT (default: the first free from 6817, so that another cluster on this
# machine does not collide; the two slurmd ports are the next free ones), DT_SLURM_TIMEOUT (60 s for
# the nodes to become idle). Facts behind each setting: README.md (SLURM) / tests/test_slurm_cluster.py's docstring.
set -euo pipefail

DIR=${1:?usage: slurm-up.sh STATE_DIR}
case $DIR in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
MINJOBAGE=${DT_SLURM_MINJOBAGE:-300}
KILLWAIT=${DT_SLURM_KILLWAIT:-5}
TIMEOUT=${DT_SLURM_TIMEOUT:-60}

log() { echo "[slurm-up] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: slurmd must be root to start jobs (and apt-get may be needed)"
missing=0
for b in munged munge slurmctld slurmd sinfo sbatch scontrol; do command -v "$b" >/dev/null || missing=1; done
if [ "$missing" = 1 ]; then
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >&2
fi

HOST=$(hostname -s)
# Every daemon resolves SlurmctldHost and the node name: an unresolvable one is fatal.
if ! getent hosts "$HOST" >/dev/null; then
  log "hostname $HOST does not resolve: adding '127.0.0.1 $HOST' to /etc/hosts"
  echo "127.0.0.1 $HOST" >> /etc/hosts
fi

NODES=(n1 n2)
ADDRS=(127.0.0.1 127.0.0.1)
mkdir -p "$DIR"/{etc,state,spool/n1,spool/n2,run,log,munge}
chmod 755 "$DIR" "$DIR"/{etc,state,spool,spool/n1,spool/n2,run,log}
chmod 711 "$DIR/munge"  # munged refuses a socket directory that is not searchable by all
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
MUNGE_KEY=$DIR/munge/munge.key
export SLURM_CONF=$CONF

alive() {  # alive NAME: the pid recorded for NAME (slurmd-n1: program slurmd) still runs that program
  local f=$DIR/run/$1.started pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${1%%-*}" ]
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {  # free_port FROM: the first port from FROM on that nothing listens on
  local p=$1
  while listening "$p"; do p=$((p + 2)); done
  echo "$p"
}
# Ports: kept from an earlier start of this cluster (its daemons listen on them), else free ones.
if [ -f "$CONF" ] && alive slurmctld; then
  CTLD_PORT=$(sed -n 's/^SlurmctldPort=//p' "$CONF")
  PORT1=$(sed -n 's/^NodeName=n1 .* Port=\([0-9]*\).*/\1/p' "$CONF")
  PORT2=$(sed -n 's/^NodeName=n2 .* Port=\([0-9]*\).*/\1/p' "$CONF")
else
  CTLD_PORT=${DT_SLURM_CTLD_PORT:-$(free_port 6817)}
  PORT1=$(free_port $((CTLD_PORT + 1)))
  PORT2=$(free_port $((PORT1 + 2)))
fi

# A munge key of our own, root-owned, 0400: munged (as root here) refuses anything laxer, and the
# system's /etc/munge/munge.key belongs to the munge user.
if [ ! -s "$MUNGE_KEY" ]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile="$MUNGE_KEY" --force
  else
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
  fi
fi
chown root:root "$MUNGE_KEY"
chmod 400 "$MUNGE_KEY"

# Each node is described as slurmd measures this machine (a RealMemory above that would drain it);
# both share the machine, which config_overrides lets them claim.
NODE_LINE=$(slurmd -C | head -n 1)
case $NODE_LINE in NodeName=*) ;; *) die "unexpected 'slurmd -C' output: $NODE_LINE" ;; esac
HARDWARE=$(sed -E 's/^NodeName=[^ ]+ //' <<< "$NODE_LINE")

NEW_CONF=$(cat <<EOF
# Written by .ci/slurm-up.sh: a two-node cluster on loopback for CI. No accounting: sacct does not work.
ClusterName=dtci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held cred_expire (120 s) + 1 s; tests release it with StartTime=now.
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
# %n: the node name; two slurmd on one host need their own spool, pid and log.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# The node lines' CPUs/memory, not the hardware's (both nodes are this machine).
SlurmdParameters=config_overrides
# Each slurmd listens on its own NodeAddr only, not on every address.
CommunicationParameters=NoInAddrAny
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (not mounted in containers: every step would fail): track processes by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# The default /bin/mail is not installed.
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Start a submitted job within ~1 s (default: up to 3 s).
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Refuse at submission what can never run (else: PENDING forever, Reason=PartitionConfig).
EnforcePartLimits=ALL
# Finished jobs stay visible in squeue/scontrol for MinJobAge..MinJobAge+30 s.
MinJobAge=$MINJOBAGE
KillWait=$KILLWAIT
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=n1 NodeHostname=localhost NodeAddr=${ADDRS[0]} Port=$PORT1 $HARDWARE State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=${ADDRS[1]} Port=$PORT2 $HARDWARE State=UNKNOWN
PartitionName=cpu Nodes=n1 Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=n1,n2 MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=0
if [ ! -f "$CONF" ] || [ "$NEW_CONF" != "$(cat "$CONF")" ]; then
  printf '%s\n' "$NEW_CONF" > "$CONF"
  CONF_CHANGED=1
fi
# Debian's slurmd reads plugstack.conf next to slurm.conf: an empty one keeps /etc/slurm out.
[ -f "$DIR/etc/plugstack.conf" ] || : > "$DIR/etc/plugstack.conf"

start() {  # start NAME CMD...: in the background, in its own session, pid recorded
  local name=$1 pid
  shift
  if alive "$name"; then
    log "$name already running (pid $(cat "$DIR/run/$name.started"))"
    return 0
  fi
  setsid "$@" </dev/null >>"$DIR/log/$name.stdout" 2>&1 &
  pid=$!
  echo "$pid" > "$DIR/run/$name.started"
  sleep 0.3
  [ -d "/proc/$pid" ] || { tail -n 20 "$DIR/log/$name.stdout" >&2; die "$name exited at start (see $DIR/log)"; }
  log "started $name (pid $pid)"
}
T0=$(date +%s%N)

start munged munged --foreground --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
  --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge round trip failed ($DIR/log/munged.log)"

# A changed slurm.conf needs a restart: `scontrol reconfigure` does not apply everything.
if [ "$CONF_CHANGED" = 1 ]; then
  for name in slurmd-n1 slurmd-n2 slurmctld; do
    alive "$name" || continue
    pid=$(cat "$DIR/run/$name.started")
    log "slurm.conf changed: restarting $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    [ -d "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    rm -f "$DIR/run/$name.started"
  done
fi
# -i: discard saved state that does not fit this config instead of refusing to start.
start slurmctld slurmctld -D -i -f "$CONF"
start slurmd-n1 slurmd -D -N n1 -f "$CONF"
start slurmd-n2 slurmd -D -N n2 -f "$CONF"

deadline=$(( $(date +%s) + TIMEOUT ))
for node in "${NODES[@]}"; do
  while :; do
    state=$(sinfo -h -N -n "$node" -o "%t" 2>/dev/null | head -n 1 || true)
    case $state in idle|mix|alloc) break ;; esac
    case $state in down*|drain*|drng*|fail*|inval*)
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;  # a drain saved in the state
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd-$node.log" >&2 || true
      die "node $node not idle after ${TIMEOUT} s (state: '${state:-no answer}')"
    fi
    sleep 0.2
  done
done
log "nodes ${NODES[*]} are up after $(( ($(date +%s%N) - T0) / 1000000 )) ms (ports $CTLD_PORT/$PORT1/$PORT2, state in $DIR)"
sinfo -h -o "%P %a %D %t %c" | sed 's/^/[slurm-up] sinfo: /' >&2
echo "export SLURM_CONF=$CONF"
