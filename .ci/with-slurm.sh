#!/usr/bin/env bash
# Run a command with a two-node SLURM cluster up (CI: the real-cluster tests need one).
#
#   bash .ci/with-slurm.sh python -m pytest -q -n 2 tests
#
# Brings the cluster up in a new temporary folder (.ci/slurm-up.sh, as root; installs slurm-wlm
# and munge with apt-get if missing), exports SLURM_CONF, runs the command, always brings the
# cluster down (.ci/slurm-down.sh), and exits with the command's status. The folder (config and
# daemon logs) is removed after a success and kept, with its path printed, after a failure.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d "${TMPDIR:-/tmp}/dt-slurm-ci.XXXXXX")
status=1
finish() {
  "$here/slurm-down.sh" "$dir"
  if [ "$status" = 0 ]; then rm -rf "$dir"; else echo "[with-slurm] cluster logs kept in $dir/log" >&2; fi
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

line=$("$here/slurm-up.sh" "$dir") || { echo "[with-slurm] error: the SLURM cluster did not come up" >&2; exit 1; }
eval "$line"  # export SLURM_CONF=...
echo "[with-slurm] $(sinfo -h -o 'partition %P %a, %D node(s) %t, %c CPUs')"
"$@"
status=$?
exit "$status"
