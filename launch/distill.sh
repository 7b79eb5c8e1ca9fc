#!/usr/bin/env bash
# `minitron distill` on every rank of this node under torchrun; rendezvous and --dry-run: see launch/torchrun.sh.
#   launch/distill.sh [--dry-run] [minitron distill flags...]
set -euo pipefail
dry=(); if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
exec "$(dirname "$0")/torchrun.sh" "${dry[@]}" distill "$@"
