#!/usr/bin/env bash
# The README's second command (and what .ci/run calls): install everything, run the whole
# test suite, slow scenarios included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/install.sh
export TCP_NODELAY=1
set +e
# Two pytest-xdist workers, each taking whole test files (a module's node and Orthanc stay in one
# process): much of the suite waits on Orthanc, dcmtk and the node's own processes, so two
# workers are faster even on two cores. Files go out longest first (tests/conftest.py's
# FILE_SECONDS; xdist's own reorder by test count is off). MR2CT_TEST_WORKERS=0 runs it in one process.
.venv/bin/python -m pytest -m "slow or not slow" --durations=25 -n "${MR2CT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no test"
    exit 0
fi
exit "$status"
