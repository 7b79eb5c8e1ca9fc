#!/usr/bin/env bash
# Submits a Slurm template with this site's settings:
#   launch/sbatch.sh [sbatch options...] launch/slurm/JOB.sbatch [minitron JOB flags...]
# It sources the site file ($MINITRON_SITE, default launch/site.env) so that its SBATCH_* variables
# (partition, account, time limit...) reach sbatch; options given here still win over them. The job
# finds this checkout and the site file through MINITRON_HOME and MINITRON_SITE (sbatch passes the
# environment on, so the site file must not set SBATCH_EXPORT=NONE).
set -euo pipefail
MINITRON_HOME=$(cd "$(dirname "$0")/.." && pwd)
MINITRON_SITE=$(realpath "${MINITRON_SITE:-$MINITRON_HOME/launch/site.env}")
if [[ ! -f $MINITRON_SITE ]]; then
  echo "no site file $MINITRON_SITE: cp launch/site.env.example launch/site.env and edit it" >&2
  exit 2
fi
# shellcheck source=launch/site.env.example
source "$MINITRON_SITE"
export MINITRON_HOME MINITRON_SITE
exec sbatch "$@"
