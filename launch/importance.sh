#!/usr/bin/env bash
# `minitron importance` on every rank of this node under torchrun; rendezvous and --dry-run: see launch/torchrun.sh.
#   launch/importance.sh [--dry-run] [minitron importance flags...]
set -euo pipefail
dry=(); if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
exec "$(dirname "$0")/torchrun.sh" "${dry[@]}" importance "$@"
