#!/usr/bin/env bash
# `minitron prune` on every rank of this node under torchrun; rendezvous and --dry-run: see launch/torchrun.sh.
#   launch/prune.sh [--dry-run] [minitron prune flags...]
set -euo pipefail
dry=(); if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
exec "$(dirname "$0")/torchrun.sh" "${dry[@]}" prune "$@"
