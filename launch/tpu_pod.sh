#!/usr/bin/env bash
# The CLI on every worker of a Cloud TPU VM (a pod slice: one process per worker host, each driving its
# local chips), joined by `jax.distributed.initialize()` auto-detection (--distributed=auto).
# Not run in this repository's CI or dev machine (no gcloud, no TPU); `bash -n` clean and DRY_RUN-tested.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]
#   launch/tpu_pod.sh my-v5e-32 us-west4-a experiments/configs/beauty_recgpt.py /mnt/runs/beauty_recgpt \
#       --config.mesh.data=-1 --config.mesh.model=1
#
# CONFIG and relative paths are resolved on the workers, relative to REPO_DIR.
# WORKDIR: every worker writes its part of each checkpoint into it and resuming reads all of it back, so
# it must be the same shared directory on all workers: a Filestore (NFS) mount or a Cloud Storage bucket
# mounted with gcsfuse at the same path on every worker. The CLI currently opens the workdir with
# pathlib/open(), so a gs://bucket/... URL is rejected here (it would create a local "gs:" folder on each
# worker); mount the bucket instead.
#
# Environment (all optional):
#   PROJECT     gcloud project (default: gcloud's configured project)
#   REPO_DIR    checkout of this repository on the workers (default ~/recgpt-jax), with .venv installed
#   SETUP=1     first, on all workers: clone REPO_URL into REPO_DIR (git pull if already there), check out
#               REF if set, create REPO_DIR/.venv and `pip install -e . "jax[tpu]"`; then run as usual.
#               REPO_URL defaults to this checkout's `origin` remote.
#   STOP=1      instead of running: send SIGINT to the runs this script started on all workers (pid file
#               /tmp/recgpt_jax.pid); only TPU_NAME and ZONE are needed. Use it after a Ctrl-C here (which
#               does not reach the workers) or when one worker failed and the others wait for it.
#   GCLOUD_SSH_FLAGS  extra flags for `gcloud compute tpus tpu-vm ssh`, e.g. "--internal-ip" or
#               "--tunnel-through-iap" (split on spaces)
#   DRY_RUN=1   print the gcloud commands instead of running them
#
# Flags after WORKDIR are passed through unchanged (each is quoted with printf %q for the remote shell,
# which must be bash, the default on TPU VM images). Process 0 prints progress and results; the other
# workers print only errors. The same command resumes from the workdir's last checkpoint.
set -euo pipefail

usage="usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]   (STOP=1: TPU_NAME ZONE)"
if [ "${STOP:-0}" = 1 ]; then
  [ "$#" -ge 2 ] || { echo "$usage" >&2; exit 2; }
elif [ "$#" -lt 4 ]; then
  echo "$usage" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
shift 2
REPO_DIR=${REPO_DIR:-"~/recgpt-jax"}
PIDFILE=/tmp/recgpt_jax.pid

# REPO_DIR for the remote shell: a leading ~ must stay unquoted to expand on the worker.
case $REPO_DIR in
  "~") remote_dir='~' ;;
  "~/"*) remote_dir="~/$(printf '%q' "${REPO_DIR#\~/}")" ;;
  *) remote_dir=$(printf '%q' "$REPO_DIR") ;;
esac

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  gcloud_ssh+=(--project="$PROJECT")
fi
if [ -n "${GCLOUD_SSH_FLAGS:-}" ]; then
  read -r -a extra <<<"$GCLOUD_SSH_FLAGS"
  gcloud_ssh+=("${extra[@]}")
fi

on_workers() {  # on_workers REMOTE_COMMAND: runs the command on all workers (or prints it with DRY_RUN=1)
  if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${gcloud_ssh[@]}"
    printf -- "--command='%s'\n" "${1//\'/\'\\\'\'}"
  else
    "${gcloud_ssh[@]}" --command="$1"
  fi
}

if [ "${STOP:-0}" = 1 ]; then
  # Only if the pid file's process is still the CLI (not a later process that reused the pid).
  stop='pid=$(cat '$PIDFILE' 2>/dev/null || true)'
  stop+='; if [ -n "$pid" ] && grep -q recgpt_jax.main "/proc/$pid/cmdline" 2>/dev/null && kill -INT "$pid"'
  stop+='; then echo "$(hostname): sent SIGINT to $pid"; else echo "$(hostname): no run"; fi'
  on_workers "$stop"
  exit 0
fi

CONFIG=$1
WORKDIR=$2
shift 2
case $WORKDIR in
  gs://*)
    echo "error: WORKDIR=$WORKDIR: the CLI writes the workdir with pathlib/open(), not a gs:// client;" \
      "mount the bucket with gcsfuse at the same path on every worker (or use Filestore) and pass that path" >&2
    exit 2
    ;;
esac

if [ "${SETUP:-0}" = 1 ]; then
  REPO_URL=${REPO_URL:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)}
  if [ -z "$REPO_URL" ]; then
    echo "error: SETUP=1 needs REPO_URL (this checkout has no 'origin' remote)" >&2
    exit 2
  fi
  setup="set -e"
  setup+="; if [ -d $remote_dir/.git ]; then git -C $remote_dir pull --ff-only; else git clone $(printf '%q' "$REPO_URL") $remote_dir; fi"
  setup+="; cd $remote_dir"
  if [ -n "${REF:-}" ]; then
    setup+="; git fetch origin && git checkout $(printf '%q' "$REF")"
  fi
  setup+="; [ -x .venv/bin/python ] || python3 -m venv .venv"
  setup+="; .venv/bin/python -m pip install -q --upgrade pip"
  setup+="; .venv/bin/python -m pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
  setup+="; .venv/bin/python -c 'import socket, jax, recgpt_jax; print(socket.gethostname(), \"jax\", jax.__version__)'"
  echo "tpu_pod.sh: setting up $REPO_DIR on all workers of $TPU_NAME" >&2
  on_workers "$setup"
fi

run="cd $remote_dir && echo \$\$ > $PIDFILE && exec .venv/bin/python -m recgpt_jax.main --distributed=auto"
run+=" $(printf '%q' "--config=$CONFIG") $(printf '%q' "--workdir=$WORKDIR")"
for flag in "$@"; do
  run+=" $(printf '%q' "$flag")"
done
echo "tpu_pod.sh: running on all workers of $TPU_NAME (Ctrl-C here does not stop them: use STOP=1)" >&2
on_workers "$run"
