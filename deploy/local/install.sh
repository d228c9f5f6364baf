#!/usr/bin/env bash
# Install everything mr2ct needs on a fresh Debian machine (root, Python 3.11, no GPU):
# Debian's Orthanc (+ DICOMweb and Python plugins), dcmtk, dicom3tools, PostgreSQL (the tests
# start their own server on a loopback port; no system service is started), Chromium (the
# dashboard test drives it headless through Playwright; no browser is downloaded), rsyslog with
# its TLS and RELP inputs (the audit export's tests run it as the repository), and a venv
# at .venv with the project and torch==2.13.0 (CPU build). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/../.."

APT_PACKAGES=(orthanc orthanc-dicomweb orthanc-python orthanc-postgresql dcmtk dicom3tools postgresql openssl chromium rsyslog rsyslog-gnutls rsyslog-relp)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install: apt packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # Debian's orthanc postinst tries to start a system service; there is none here, and mr2ct
    # starts Orthanc itself with its own config, so a refusal to start it is expected.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    echo "install: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, pynetdicom, highdicom, orthanc_api_client; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "install: ready (Orthanc $(Orthanc --version 2>/dev/null | head -1 | awk '{print $NF}'), $(storescu --version | head -1 | cut -c1-40), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
