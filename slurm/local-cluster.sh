#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the Slurm integration tests (tests/integration/test_slurm.py).
#
#   sudo bash slurm/local-cluster.sh        # idempotent: returns at once when the cluster is already up
#
# As root on Debian/Ubuntu: installs slurm-wlm and munge if missing, creates a munge key, starts munged,
# writes /etc/slurm/slurm.conf (one node = this host with all its CPUs, one default partition, requeue on),
# starts slurmctld and slurmd, and waits until `sinfo` shows the node idle. No systemd, no cgroups needed
# (proctrack/linuxproc, task/none), no accounting database (so no `sacct`: use `scontrol show job`).
#
# Environment: SLURM_LOCAL_FORCE_CONFIG=1 rewrites slurm.conf and restarts the daemons even when they run.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
HOST=$(hostname -s)

log() { echo "local-cluster: $*" >&2; }

node_state() { sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true; }

running() { pgrep -x "$1" >/dev/null 2>&1; }

# -- the configuration this script wants ----------------------------------------------------------
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)  # below the real value, or DRAIN
NEW_CONF=$(cat <<EOF
# Written by slurm/local-cluster.sh: a single-node test cluster on $HOST.
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
# A requeued job may start again after cred_expire seconds (default 120): short here, for the tests.
AuthInfo=cred_expire=10
MinJobAge=3600
KillWait=30
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=1-00:00:00 State=UP OverSubscribe=NO
EOF
)
# Fast path (CI calls this every run): daemons up and the node schedulable.
if [[ "${SLURM_LOCAL_FORCE_CONFIG:-0}" != 1 ]] && command -v sinfo >/dev/null && [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$NEW_CONF" ]] \
    && running munged && running slurmctld && running slurmd; then
  case "$(node_state)" in
    idle|mixed|allocated|completing) log "already up ($(node_state))"; exit 0 ;;
  esac
fi

if [[ $(id -u) != 0 ]]; then
  log "must run as root (installs packages, writes $CONF, starts daemons)"; exit 1
fi

# -- packages --------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  fi
fi

# -- munge -----------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key --force
  else
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
fi
if id munge >/dev/null 2>&1; then
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
fi
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! running munged; then
  log "starting munged"
  if id munge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  else
    /usr/sbin/munged --force
  fi
fi
for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# -- slurm.conf ------------------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
  log "writing $CONF ($CPUS CPUs, ${MEM_MB} MB)"
  printf '%s\n' "$NEW_CONF" >"$CONF"
  restart=1
fi
[[ "${SLURM_LOCAL_FORCE_CONFIG:-0}" == 1 ]] && restart=1
if [[ $restart == 1 ]]; then
  for daemon in slurmd slurmctld; do
    if running "$daemon"; then
      log "stopping $daemon (new configuration)"
      pid=$(cat "/run/$daemon.pid" 2>/dev/null || true)
      [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do running "$daemon" || break; sleep 0.2; done
    fi
  done
fi

# -- daemons ---------------------------------------------------------------------------------------
if ! running slurmctld; then
  log "starting slurmctld"
  slurmctld
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping | grep -q UP || { log "slurmctld does not answer; see $LOG_DIR/slurmctld.log"; exit 1; }
if ! running slurmd; then
  log "starting slurmd"
  slurmd
fi

for i in $(seq 150); do
  state=$(node_state)
  case "$state" in
    idle|mixed|allocated|completing) log "up: node $HOST $state, $CPUS CPUs"; exit 0 ;;
    drained|draining|down|fail)
      if (( i % 10 == 1 )); then
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
      fi ;;
  esac
  sleep 0.2
done
log "node $HOST is '$(node_state)', not idle; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
sinfo -N -l >&2 || true
exit 1
