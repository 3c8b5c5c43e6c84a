#!/usr/bin/env bash
# Debian packages that some tests need: a real Slurm, its nodes in network namespaces (`ip`;
# tests marked `slurm`), and headless Chromium (tests marked `browser`). As root, installs whichever is missing; otherwise
# says in one line how to install them (those tests are then skipped, except in CI).
set -euo pipefail
missing=()
command -v sbatch >/dev/null 2>&1 || missing+=(slurmctld slurmd slurm-client munge)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "system packages: missing ${missing[*]}; their tests are skipped (install as root: sudo bash env/system-packages.sh)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
