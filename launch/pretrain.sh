#!/usr/bin/env bash
# `minitron pretrain` on every rank of this node under torchrun; rendezvous and --dry-run: see launch/torchrun.sh.
#   launch/pretrain.sh [--dry-run] [minitron pretrain flags...]
set -euo pipefail
dry=(); if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
exec "$(dirname "$0")/torchrun.sh" "${dry[@]}" pretrain "$@"
