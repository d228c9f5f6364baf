"""Four scanners send at once: every instance acknowledged, spooled and recorded; four sCT series."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from dicom_node.models import Instance
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import study_series
from training.phantom_dicom import write_mr_series


def test_four_storescu_at_once_250_instances_each(node, orthanc, tmp_path):
    series = [
        write_mr_series(tmp_path / f"scanner{i}", seed=400 + i, slices=250, size=128, pixel_spacing=1.0, slice_spacing=0.8)
        for i in range(4)
    ]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results: list[subprocess.CompletedProcess[str]] = list(
            pool.map(lambda s: storescu(s.folder, node.port, NODE_AE, SCANNER_AE), series)
        )
    sent_seconds = time.monotonic() - started
    for result in results:
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    print(f"1000 instances from 4 senders acknowledged in {sent_seconds:.1f} s ({1000 / sent_seconds:.0f}/s)")
    sessions = init_db(node.database_url)
    with sessions() as session:
        for s in series:
            count = session.scalar(select(func.count()).select_from(Instance).where(Instance.series_instance_uid == s.series_uid))
            assert count == 250
    spooled = [p for p in (node.workdir / "spool").rglob("*.dcm") if any(s.series_uid in str(p) for s in series)]
    assert len(spooled) == 1000
    for s in series:
        job = wait_for_job(node.database_url, s.series_uid, timeout=300)
        assert job.state == "done", job.error
        cts = [x for x in study_series(orthanc, s.study_uid) if x["MainDicomTags"]["Modality"] == "CT"]
        assert len(cts) == 1 and len(cts[0]["Instances"]) == 250
