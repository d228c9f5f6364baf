#!/usr/bin/env bash
# The README's second command (and what .ci/run calls): install everything, run the whole
# test suite, slow scenarios included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/install.sh
export TCP_NODELAY=1
set +e
.venv/bin/python -m pytest -m "slow or not slow" --durations=25 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no test"
    exit 0
fi
exit "$status"
