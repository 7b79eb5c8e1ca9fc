#!/usr/bin/env bash
# `minitron search` on every rank of this node under torchrun; rendezvous and --dry-run: see launch/torchrun.sh.
#   launch/search.sh [--dry-run] [minitron search flags...]
set -euo pipefail
dry=(); if [[ ${1:-} == --dry-run ]]; then dry=(--dry-run); shift; fi
exec "$(dirname "$0")/torchrun.sh" "${dry[@]}" search "$@"
