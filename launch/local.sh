#!/bin/sh
# Single-process run on this machine (CPU, or the local GPU/TPU if jax sees one).
#   launch/local.sh experiments/configs/beauty_pretrain_ce.py runs/beauty_ce [--config.train.num_epochs=50 ...]
set -e
CONFIG=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
WORKDIR=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
exec .venv/bin/python -m recgpt_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
