#!/usr/bin/env bash
# The README's first command: install, start Orthanc and mr2ct on loopback, send a phantom
# MR series with storescu, print where the synthetic CT is. Ctrl-C stops everything;
# --once (or no terminal) stops after printing.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/install.sh
exec .venv/bin/mr2ct demo "$@"
