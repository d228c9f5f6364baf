#!/usr/bin/env bash
# The README's second command (and what .ci/run calls): install everything, run the whole
# test suite, slow scenarios included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/install.sh
export TCP_NODELAY=1
set +e
# Three pytest-xdist workers, each taking whole test files (a module's node and Orthanc stay in one
# process): much of the suite waits on Orthanc, dcmtk and the node's own processes, so on two
# cores two workers left them ~19 % idle and three ~5 % (21.5-24 min against 24.3 on the AVX2
# EPYC, 2026-12-07; the machine drifts). Files go out longest first (tests/conftest.py's FILE_SECONDS; xdist's own reorder
# by test count is off). MR2CT_TEST_WORKERS=N runs N workers, 0 the whole suite in one process.
.venv/bin/python -m pytest -m "slow or not slow" --durations=25 -n "${MR2CT_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no test"
    exit 0
fi
exit "$status"
