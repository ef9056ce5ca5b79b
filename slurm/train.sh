#!/usr/bin/env bash
# Slurm batch script for the rotation-pretraining job. Submit from the repository root (or with the `job`
# package importable by $JOB_PYTHON), unchanged:
#
#   JOB_DATA=/shared/tiny-imagenet-200.zip JOB_OUTPUT=/shared/runs/rotnet sbatch slurm/train.sh [extra job args]
#
# Every #SBATCH default below can be overridden on the sbatch command line (e.g. `sbatch --nodes=2 ...`,
# `sbatch --time=02:00:00 ...`, `sbatch --mem-per-gpu=32G ...`). On a cluster without GPUs pass
# `--gpus-per-task=0 --mem-per-gpu=0`: Slurm refuses a per-GPU memory request without GPUs ("Invalid generic
# resource (gres) specification"), and `--mem`/`--mem-per-cpu` cannot replace it (sbatch: "mutually exclusive").
#
# Environment (read at submission: sbatch exports the submitting shell's environment):
#   JOB_DATA     --data: Tiny ImageNet zip/directory, gs:// or https:// (default: data/tiny-imagenet-200.zip)
#   JOB_OUTPUT   --output: run directory or gs:// prefix        (default: runs/<job name>-<job id>)
#   JOB_CONFIG   --config: a config name or TOML file           (default: the job's own default)
#   JOB_COMMAND  run | pretrain | finetune | evaluate            (default: run)
#   JOB_SET      space-separated section.key=value overrides, each passed as --set (no spaces inside values:
#                pass those as extra arguments, e.g. sbatch slurm/train.sh --set 'evaluate.label_fractions=[0.1, 1.0]')
#   JOB_PYTHON   the interpreter, may be several words (default: python; e.g. .venv/bin/python or
#                "apptainer exec --nv rotnet.sif python")
#   JOB_CACHE_DIR  data.cache_dir: downloads and the decode cache (default: rotnet-job/ in the node-local
#                $SLURM_TMPDIR, else $TMPDIR, when set; else the job's default ~/.cache/rotnet-job)
# Arguments after the script name are passed to `python -m job $JOB_COMMAND` unchanged.
#
# One Slurm task per worker: with more than one task (e.g. --nodes=2, or --ntasks-per-node=2), every task
# runs the same command and job/distribute.py builds a MultiWorkerMirroredStrategy from the Slurm
# environment, in srun's block task order, on ports derived from the job id (job/slurm.py); task 0 is the
# chief and alone writes the shared artifacts.
#
# Preemption and time limits: Slurm sends SIGUSR1 to this script 120 s before the time limit (--signal),
# and `scancel --signal=USR1 --batch JOBID` does the same by hand. The script then sends SIGUSR1 to the
# job's tasks, which checkpoint after their current step and exit with 143, and requeues the job
# (`scontrol requeue`): it starts again under the same job id, appends to the same log, and the same
# command resumes from the checkpoint. A plain `scancel JOBID` (SIGTERM from Slurm to every task) stops the
# job for good after the tasks checkpointed; resubmitting with the same JOB_OUTPUT resumes it.
#
#SBATCH --job-name=rotnet
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
# Host memory per GPU (one GPU per task): on 100,000 images the data layer peaks at 2.5 GB of RSS (README:
# Throughput), plus TensorFlow's CUDA/cuDNN host allocations and the decode cache's page cache, which a job's
# memory cgroup counts on most clusters.
#SBATCH --mem-per-gpu=16G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append

set -uo pipefail

log() { echo "$(date '+%H:%M:%S') slurm/train.sh: $*"; }

stop_signal=""
srun_pid=""

on_signal() {
  local sig=$1
  if [[ -n $stop_signal ]]; then
    log "SIG$sig again: already stopping"
    return
  fi
  stop_signal=$sig
  if [[ $sig == TERM ]]; then
    # scancel, the time limit or preemption: Slurm signals every task itself. Forwarding it again would be
    # the tasks' second signal, which makes them exit without a checkpoint.
    log "SIGTERM: Slurm is ending the job; the tasks save a checkpoint on their own SIGTERM"
    return
  fi
  log "SIG$sig: asking the tasks to save a checkpoint and stop, then requeueing the job"
  if [[ -n $srun_pid ]] && kill -0 "$srun_pid" 2>/dev/null; then
    # SIGUSR1, not SIGTERM: srun turns a SIGTERM it receives into SIGKILL for its tasks, and TensorFlow's
    # multi-worker runtime installs its own SIGTERM handler over the job's. scancel signals every job step
    # but this batch shell; srun itself forwards SIGUSR1 unchanged (the fallback).
    scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$srun_pid"
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

JOB_PYTHON=${JOB_PYTHON:-python}
JOB_COMMAND=${JOB_COMMAND:-run}
JOB_DATA=${JOB_DATA:-data/tiny-imagenet-200.zip}
JOB_OUTPUT=${JOB_OUTPUT:-runs/${SLURM_JOB_NAME:-rotnet}-${SLURM_JOB_ID:-local}}
JOB_CONFIG=${JOB_CONFIG:-}
JOB_SET=${JOB_SET:-}
# Node-local scratch for the decode cache (reading it is the input pipeline's first step on every start).
scratch=${SLURM_TMPDIR:-${TMPDIR:-}}
JOB_CACHE_DIR=${JOB_CACHE_DIR:-${scratch:+$scratch/rotnet-job}}
EXIT_PREEMPTED=143

case "$JOB_COMMAND" in
  run|pretrain|finetune|evaluate) ;;
  *) echo "error: JOB_COMMAND=$JOB_COMMAND: use run, pretrain, finetune or evaluate." >&2; exit 2 ;;
esac

read -r -a python_cmd <<<"$JOB_PYTHON"
args=("${python_cmd[@]}" -m job "$JOB_COMMAND" --data "$JOB_DATA" --output "$JOB_OUTPUT")
[[ -n $JOB_CONFIG ]] && args+=(--config "$JOB_CONFIG")
# Before JOB_SET and the extra arguments: a data.cache_dir given there wins.
[[ -n $JOB_CACHE_DIR ]] && args+=(--set "data.cache_dir=$JOB_CACHE_DIR")
read -r -a overrides <<<"$JOB_SET"
for item in "${overrides[@]}"; do args+=(--set "$item"); done
args+=("$@")

# srun of Slurm 22.05 does not inherit --cpus-per-task from sbatch; later versions read this too.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
export PYTHONUNBUFFERED=1

log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) start $(( ${SLURM_RESTART_COUNT:-0} + 1 )):" \
    "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, nodes ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} task(s)," \
    "${SLURM_CPUS_PER_TASK:-?} CPU(s) per task, GPUs per task ${SLURM_GPUS_PER_TASK:-0}"
log "data.cache_dir: ${JOB_CACHE_DIR:-default} (JOB_CACHE_DIR)"
log "running: ${args[*]}"

rc=0
if [[ -z $stop_signal ]]; then
  srun --kill-on-bad-exit=1 --distribution=block --label "${args[@]}" &
  srun_pid=$!
  # `wait` returns early (status > 128) when a trapped signal arrives: keep waiting for srun itself.
  while true; do
    wait "$srun_pid"
    rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
else
  rc=$EXIT_PREEMPTED  # stopped before the tasks started
fi

if [[ $stop_signal == USR1 ]] && (( rc != 0 && rc != 2 )); then
  log "tasks stopped (exit $rc); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit "$EXIT_PREEMPTED"  # Slurm ends this shell and starts the job again
  fi
  log "requeue failed: submit the same command again to resume"
fi
log "exit $rc"
exit "$rc"
