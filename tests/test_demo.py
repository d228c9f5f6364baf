"""The README's first command: `mr2ct demo` starts Orthanc and mr2ct on loopback, sends a phantom MR
series with storescu, says where its sCT is, and (with --once, or with no terminal) stops all it
started. Run here on free ports and a short series, as `deploy/local/demo.sh` runs it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from dicom_node.local_stack import free_port
from tests.helpers import env_without_mr2ct


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_the_demo_shows_where_the_sct_is_and_stops_what_it_started(tmp_path: Path) -> None:
    ports = {"--orthanc-http-port": free_port(), "--orthanc-dicom-port": free_port(), "--node-port": free_port(), "--api-port": free_port()}
    env = env_without_mr2ct()  # the demo's own defaults, nothing of the test run's
    args = [sys.executable, "-m", "dicom_node.cli", "demo", "--once", "--workdir", str(tmp_path / "demo"), "--slices", "4"]
    for option, port in ports.items():
        args += [option, str(port)]
    shown = subprocess.run(args, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
    assert shown.returncode == 0, shown.stdout[-3000:] + shown.stderr[-3000:]
    out = shown.stdout
    assert "synthetic CT stored in Orthanc" in out
    http = ports["--orthanc-http-port"]
    assert re.search(rf"Orthanc Explorer : http://127\.0\.0\.1:{http}/app/explorer\.html#study\?uuid=[0-9a-f-]{{44}}\n", out), out
    assert re.search(r"sCT series UID   : [0-9.]+ \(4 instances\)", out), out
    assert re.search(r"SR series UID    : [0-9.]+\n", out), out
    ct_uid = re.search(r"sCT series UID   : ([0-9.]+)", out).group(1)
    assert re.search(rf"on the MR series : mr2ct .* UTC: sCT stored in this study: CT series {re.escape(ct_uid)} ", out), out
    assert re.search(rf"admin API        : http://127\.0\.0\.1:{ports['--api-port']}/jobs  \(auditor token: mr2ct_", out), out
    assert "stopping (--once or no terminal)." in out
    assert not [port for port in ports.values() if _listening(port)]  # Orthanc, the node and its API all stopped
    assert (tmp_path / "demo" / "node" / "mr2ct.log").stat().st_size > 0
