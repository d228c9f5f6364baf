"""Orthanc as the first stop: an MR series uploaded to Orthanc comes back with its sCT and SR in the
same study without any call to the node; the "Synthesize CT" action re-sends on demand."""

from __future__ import annotations

import io
import re
import time
from contextlib import contextmanager

import httpx
import pydicom
import pytest

from dicom_node.local_stack import NodeServer, OrthancServer, free_port, storescu
from dicom_node.orthanc_store import ROUTED_BY_NODE
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import env_without_mr2ct, headless_chromium
from training.phantom_dicom import write_mr_series


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    node_port = free_port()
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc-plugin"), free_port(), free_port(),
                            modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]}, python_plugin=True, stable_age=2)
    with orthanc:
        workdir = tmp_path_factory.mktemp("plugin-node")
        env = node_env(workdir, node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{orthanc.aet}@127.0.0.1"
        node = NodeServer(workdir, env, node_port)
        with node:
            yield orthanc, node


def _study_series(orthanc: OrthancServer, study_uid: str) -> list[dict]:
    found = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, auth=orthanc.auth).json()
    study = [r["ID"] for r in found if r["Type"] == "Study"]
    return orthanc.get(f"/studies/{study[0]}/series") if study else []


def _upload(orthanc: OrthancServer, payloads: list[bytes]) -> None:
    """Store DICOM files into Orthanc over REST, as a user uploading a study would."""
    for data in payloads:
        assert httpx.post(f"{orthanc.url}/instances", content=data, auth=orthanc.auth).status_code == 200


def _wait_for(orthanc, study_uid, predicate, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = _study_series(orthanc, study_uid)
        if predicate(series):
            return series
        time.sleep(0.5)
    raise AssertionError(f"condition not met for study {study_uid} in {timeout} s")


def _jobs_done(node: NodeServer, series_uid: str, wanted: int, timeout: float = 120) -> int:
    """How many of the series' jobs the node has done, once that is ``wanted`` (or the time is up)."""
    from sqlalchemy import func, select

    from dicom_node.db import init_db
    from dicom_node.models import Job

    sessions = init_db(node.env["MR2CT_DATABASE_URL"])
    query = select(func.count()).select_from(Job).where(Job.series_instance_uid == series_uid, Job.state == "done")
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            done = session.scalar(query) or 0
        if done >= wanted or time.monotonic() > deadline:
            return done
        time.sleep(0.5)


def test_an_mr_series_uploaded_to_orthanc_gets_its_sct_without_calling_the_node(stack, tmp_path):
    orthanc, _ = stack
    series = write_mr_series(tmp_path / "mr", seed=700, slices=6, size=64, pixel_spacing=4.0, slice_spacing=8.0)
    _upload(orthanc, [f.read_bytes() for f in series.files])
    result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
    ct = [x for x in result if x["MainDicomTags"]["Modality"] == "CT"]
    assert len(ct) == 1 and len(ct[0]["Instances"]) == 6


def test_the_synthesize_action_resends_on_demand_and_refuses_non_mr(stack, tmp_path):
    orthanc, node = stack
    series = write_mr_series(tmp_path / "mr", seed=701, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    for f in series.files:
        httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth)
    result = _wait_for(orthanc, series.study_uid, lambda s: any(x["MainDicomTags"]["Modality"] == "CT" for x in s))
    mr_id = next(x["ID"] for x in result if x["MainDicomTags"]["Modality"] == "MR")
    ct_id = next(x["ID"] for x in result if x["MainDicomTags"]["Modality"] == "CT")
    explorer_js = httpx.get(f"{orthanc.url}/plugins/explorer.js", auth=orthanc.auth).text
    assert "Synthesize CT" in explorer_js
    sent = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr_id}", auth=orthanc.auth)
    assert sent.status_code == 200 and sent.json()["series"] == mr_id
    refused = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{ct_id}", auth=orthanc.auth)
    assert refused.status_code == 400 and refused.text == "only MR series can be synthesized"  # the reason, for the button's alert
    for bad in (f"{mr_id}/../../instances", "..%2Finstances", mr_id.upper()):  # only an Orthanc series identifier reaches its REST API
        answer = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{bad}", auth=orthanc.auth)
        assert answer.status_code == 404, (bad, answer.status_code, answer.text)
    assert _jobs_done(node, series.series_uid, 2) >= 2  # the button made a second job; the sCT UIDs are the same, so Orthanc keeps one copy
    final = _study_series(orthanc, series.study_uid)
    assert sum(1 for x in final if x["MainDicomTags"]["Modality"] == "CT") == 1


def _routed_flag(orthanc: OrthancServer, series_id: str) -> str | None:
    answer = httpx.get(f"{orthanc.url}/series/{series_id}/metadata/Mr2ctRouted", auth=orthanc.auth)
    return answer.text if answer.status_code == 200 else None


def test_a_series_the_node_refuses_is_not_sent_again_and_says_why(stack, tmp_path):
    """An MR series in Orthanc with an instance that has lost its Pixel Data: the node answers its
    C-STORE 0xA900, so the plugin does not send it again and again (eight sends over eight
    minutes, each refused the same way, said only "Error in the network protocol"); the series'
    metadata says it was refused and with which status, the node's audit says why, and once the
    instance is stored mended the series is sent again by itself and gets its sCT (until
    2026-12-05 only the button sent it)."""
    import io

    import pydicom

    orthanc, node = stack
    series = write_mr_series(tmp_path / "mr", seed=708, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    broken = pydicom.dcmread(series.files[-1])
    del broken.PixelData
    with io.BytesIO() as buffer:
        broken.save_as(buffer)
        uploads = [f.read_bytes() for f in series.files[:-1]] + [buffer.getvalue()]
    _upload(orthanc, uploads)
    (mr,) = _study_series(orthanc, series.study_uid)
    deadline = time.monotonic() + 60
    while (_routed_flag(orthanc, mr["ID"]) or "sending") == "sending" and time.monotonic() < deadline:
        time.sleep(0.2)
    flag = _routed_flag(orthanc, mr["ID"]) or ""
    assert flag.startswith("refused by the node, not sent again: ") and "DIMSE status 0xA900" in flag, flag
    time.sleep(3)  # a retry would come 2 s after the first failure
    log = orthanc.log_path.read_text()
    assert f"mr2ct: mr2ct refused series {mr['ID']}" in log and f"series {mr['ID']} sent to mr2ct (job" in log
    assert log.count(f"series {mr['ID']} sent to mr2ct (job") == 1, "the refused series was sent again"
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import AuditEvent

    with init_db(node.env["MR2CT_DATABASE_URL"])() as session:
        refusals = [e for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "dicom-instance-refused", AuditEvent.actor == orthanc.aet))
                    if e.detail.get("sop_instance_uid") == str(broken.SOPInstanceUID)]
    assert len(refusals) == 1 and refusals[0].detail["status"] == "0xA900" and "Pixel Data" in refusals[0].detail["reason"]
    broken_id = httpx.post(f"{orthanc.url}/tools/lookup", content=str(broken.SOPInstanceUID), auth=orthanc.auth).json()[0]["ID"]
    assert httpx.delete(f"{orthanc.url}/instances/{broken_id}", auth=orthanc.auth).status_code == 200
    assert httpx.post(f"{orthanc.url}/instances", content=series.files[-1].read_bytes(), auth=orthanc.auth).status_code == 200
    _wait_for(orthanc, series.study_uid, lambda s: any(x["MainDicomTags"]["Modality"] == "CT" and len(x["Instances"]) == 4 for x in s))
    assert _routed_flag(orthanc, mr["ID"]) == "sent"
    assert orthanc.log_path.read_text().count(f"series {mr['ID']} sent to mr2ct (job") == 2


def test_a_slice_stored_after_the_series_was_sent_sends_it_again(stack, tmp_path):
    """A slice that reaches Orthanc after its series was found stable and sent (a second
    association from the scanner, a slice re-sent by hand) makes the series stable again: it is
    sent again and the sCT has every slice. Until 2026-12-05 a sent series was never sent again
    by itself, and the sCT lacked the late slice for good."""
    orthanc, node = stack
    series = write_mr_series(tmp_path / "mr", seed=709, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    _upload(orthanc, [f.read_bytes() for f in series.files[:3]])
    _wait_for(orthanc, series.study_uid, lambda s: any(x["MainDicomTags"]["Modality"] == "CT" and len(x["Instances"]) == 3 for x in s))
    mr = next(x for x in _study_series(orthanc, series.study_uid) if x["MainDicomTags"]["Modality"] == "MR")
    deadline = time.monotonic() + 30
    while _routed_flag(orthanc, mr["ID"]) != "sent" and time.monotonic() < deadline:
        time.sleep(0.2)
    _upload(orthanc, [series.files[3].read_bytes()])
    _wait_for(orthanc, series.study_uid, lambda s: any(x["MainDicomTags"]["Modality"] == "CT" and len(x["Instances"]) == 4 for x in s))
    assert "has new instances since it was routed (sent): sending it again" in orthanc.log_path.read_text()


def test_the_button_pressed_before_the_series_is_stable_sends_it_once(stack, tmp_path):
    """A user who presses "Synthesize CT" on a series just stored, before Orthanc finds it stable:
    that stability brings nothing new, so the series is not sent a second time."""
    orthanc, node = stack
    series = write_mr_series(tmp_path / "mr", seed=710, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    _upload(orthanc, [f.read_bytes() for f in series.files])
    (mr,) = _study_series(orthanc, series.study_uid)
    assert httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr['ID']}", auth=orthanc.auth).status_code == 200
    _wait_for(orthanc, series.study_uid, lambda s: any(x["MainDicomTags"]["Modality"] == "CT" and len(x["Instances"]) == 4 for x in s))
    time.sleep(4)  # the base config's StableAge (2 s here) has passed: the stability has come and gone
    assert orthanc.log_path.read_text().count(f"series {mr['ID']} sent to mr2ct (job") == 1


@contextmanager
def _stable_while_the_node_is_down(tmp_path, seed: int, until: str, **orthanc_options):
    """A running Orthanc with the plugin routing to a port nobody listens on yet and an MR series
    uploaded there, once the series' Mr2ctRouted metadata starts with ``until``: yields the Orthanc,
    the series, its Orthanc id, that metadata, and a `mr2ct serve` to start on the node's port."""
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]},
                       python_plugin=True, stable_age=1, **orthanc_options) as orthanc:
        series = write_mr_series(tmp_path / "mr", seed=seed, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
        _upload(orthanc, [f.read_bytes() for f in series.files])
        (mr,) = _study_series(orthanc, series.study_uid)
        deadline = time.monotonic() + 60
        while not (_routed_flag(orthanc, mr["ID"]) or "").startswith(until) and time.monotonic() < deadline:
            time.sleep(0.2)
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{orthanc.aet}@127.0.0.1"
        yield orthanc, series, mr["ID"], _routed_flag(orthanc, mr["ID"]), NodeServer(tmp_path / "node", env, node_port)


def test_a_series_routed_while_the_node_is_down_is_sent_again_once_it_is_up(tmp_path):
    """The node is restarting when a series becomes stable in Orthanc: Orthanc's store job fails,
    the plugin says so on the series (Mr2ctRouted "retrying 2/20: ...") and resubmits the job with a
    backoff; once the node is up the series goes through, is marked sent, and gets its sCT."""
    with _stable_while_the_node_is_down(tmp_path, 702, "retrying") as (orthanc, series, mr_id, flag, node):
        # the first send failed (nobody listens); a slow look may see a later retry's failure
        assert flag is not None and re.match(r"retrying ([2-9]|1[0-9]|20)/20: ", flag), flag
        pressed = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr_id}", auth=orthanc.auth)  # the button while it waits to retry
        assert pressed.status_code == 409 and "is being sent to mr2ct already" in pressed.text, pressed.text
        with node:
            result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
            assert _routed_flag(orthanc, mr_id) == "sent"
        (ct,) = [x for x in result if x["MainDicomTags"]["Modality"] == "CT"]
        assert len(ct["Instances"]) == 4
        assert "attempt 2 of 20" in orthanc.log_path.read_text()


def test_a_series_the_plugin_gave_up_on_says_so_and_the_button_sends_it(tmp_path):
    """With MR2CT_ROUTE_ATTEMPTS=2 and the node down, the plugin gives up after two sends, says so
    on the series and in Orthanc's log; the "Synthesize CT" action sends it once the node is up."""
    with _stable_while_the_node_is_down(tmp_path, 703, "failed", extra_env={"MR2CT_ROUTE_ATTEMPTS": "2"}) as (orthanc, series, mr_id, flag, node):
        assert flag is not None and flag.startswith("failed after 2 attempts: "), flag
        assert f"mr2ct: series {mr_id} not sent to mr2ct after 2 attempts" in orthanc.log_path.read_text()
        with node:
            assert httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr_id}", auth=orthanc.auth).status_code == 200
            _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
            assert _routed_flag(orthanc, mr_id) == "sent"


def test_series_owed_to_the_node_when_orthanc_restarts_are_sent_after_it(tmp_path):
    """Orthanc is restarted (an upgrade, the host rebooted) while the plugin owes the node two MR
    series: one waiting to be sent again (the node was down) and one whose last instance had
    arrived but that had not yet become stable (Orthanc forgets unstable series when it stops, so
    it never said STABLE_SERIES for it). Once Orthanc is back and the node up, both get their sCT
    without anyone pressing a button."""
    node_port = free_port()
    first = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]},
                          python_plugin=True, stable_age=4)
    config = first.write_config()  # started from the file below: the same storage and index across the restart
    retrying = write_mr_series(tmp_path / "mr-a", seed=706, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    unstable = write_mr_series(tmp_path / "mr-b", seed=707, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)

    def upload(orthanc, series):
        _upload(orthanc, [f.read_bytes() for f in series.files])
        (mr,) = _study_series(orthanc, series.study_uid)
        return mr["ID"]

    with OrthancServer(tmp_path / "orthanc", config_file=config) as orthanc:
        retrying_id = upload(orthanc, retrying)
        deadline = time.monotonic() + 60
        while not (_routed_flag(orthanc, retrying_id) or "").startswith("retrying") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (_routed_flag(orthanc, retrying_id) or "").startswith("retrying")
        unstable_id = upload(orthanc, unstable)
        assert _routed_flag(orthanc, unstable_id) is None  # 4 s of StableAge not over: not sent, not marked
    with OrthancServer(tmp_path / "orthanc", config_file=config) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{orthanc.aet}@127.0.0.1"
        with NodeServer(tmp_path / "node", env, node_port):
            for series in (retrying, unstable):
                _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s}, timeout=120)
            assert _routed_flag(orthanc, retrying_id) == _routed_flag(orthanc, unstable_id) == "sent"
        assert "mr2ct: resuming 2 series owed to mr2ct from before Orthanc restarted" in orthanc.log_path.read_text()


@pytest.mark.parametrize("route", ["rest", "c-store"])
def test_a_series_the_node_routed_into_orthanc_is_not_sent_back_to_it(tmp_path, route):
    """A site where scanners send to the node, which routes the originals on into the Orthanc that
    runs the plugin (forward_originals; over REST, or by C-STORE with forward_to): the plugin does
    not send those series back to the node, which has synthesized them already. Before, each was
    synthesized twice. The series says why it was not sent; the button still sends it."""
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]},
                       python_plugin=True, stable_age=1) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{SCANNER_AE},{orthanc.aet}@127.0.0.1"
        env["MR2CT_FORWARD_ORIGINALS"] = "true"
        if route == "c-store":
            env["MR2CT_FORWARD_TO"] = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        with NodeServer(tmp_path / "node", env, node_port) as node:
            series = write_mr_series(tmp_path / "mr", seed=709, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
            sent = storescu(series.folder, node_port, NODE_AE, SCANNER_AE)
            assert sent.returncode == 0, sent.stderr
            result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
            (mr,) = [x for x in result if x["MainDicomTags"]["Modality"] == "MR"]
            assert len(mr["Instances"]) == 4  # the originals, routed
            time.sleep(4)  # StableAge (1 s) and then some: a send back would have begun by now
            assert _routed_flag(orthanc, mr["ID"]) == ROUTED_BY_NODE
            assert _jobs_done(node, series.series_uid, 2, timeout=5) == 1
            assert f"series {mr['ID']} sent to mr2ct" not in orthanc.log_path.read_text()
            assert httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr['ID']}", auth=orthanc.auth).status_code == 200
            assert _jobs_done(node, series.series_uid, 2) == 2


def test_the_orthanc_config_command_writes_an_orthanc_that_routes_to_the_node(tmp_path):
    """A PACS administrator sets up a permanent Orthanc with `mr2ct orthanc-config`: the file it
    writes starts a real Orthanc with the generated login, the DICOMweb and Python plugins, the
    node as modality `mr2ct`; an MR series uploaded there comes back with its sCT. With --node-api
    it also writes the plugin's environment (a requester token made in the node's database), and
    the button asks the node's API. Bad options stop the command naming them, and an existing file
    is not replaced without --force."""
    import json
    import subprocess
    import sys

    node_port, api_port, config = free_port(), free_port(), tmp_path / "etc" / "orthanc.json"
    node_database = f"sqlite:///{tmp_path / 'node' / 'mr2ct.db'}"  # node_env's
    (tmp_path / "node").mkdir()
    run_env = {**env_without_mr2ct(), "MR2CT_DATABASE_URL": node_database}
    command = [sys.executable, "-m", "dicom_node.cli", "orthanc-config", "--output", str(config), "--storage", str(tmp_path / "storage"),
               "--node", f"127.0.0.1:{node_port}", "--node-aet", NODE_AE, "--http-port", str(free_port()), "--dicom-port", str(free_port()),
               "--node-api", f"http://127.0.0.1:{api_port}", "--modality", "tps=TPS@127.0.0.1:10404"]
    made = subprocess.run(command, capture_output=True, text=True, timeout=60, env=run_env)
    assert made.returncode == 0, made.stderr
    plugin_env = dict(line.split("=", 1) for line in (config.parent / "orthanc-plugin.env").read_text().splitlines())
    assert plugin_env["MR2CT_NODE_API"] == f"http://127.0.0.1:{api_port}" and plugin_env["MR2CT_NODE_API_TOKEN"].startswith("mr2ct_")
    assert oct((config.parent / "orthanc-plugin.env").stat().st_mode & 0o777) == "0o600"
    written = json.loads(config.read_text())
    password = written["RegisteredUsers"]["mr2ct"]
    assert password in made.stdout and oct(config.stat().st_mode & 0o777) == "0o600"
    assert written["DicomModalities"] == {"mr2ct": [NODE_AE, "127.0.0.1", node_port], "tps": ["TPS", "127.0.0.1", 10404]}
    assert written["PythonScript"].endswith("orthanc/plugin.py") and "modality tps: TPS@127.0.0.1:10404" in made.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, env=run_env)
    assert again.returncode == 2 and "--force" in again.stderr and json.loads(config.read_text())["RegisteredUsers"]["mr2ct"] == password
    for bad, named in ((["--node", "nohost"], "--node"), (["--postgres", "db:5432"], "--postgres"), (["--aet", "A\\B"], "--aet"),
                       (["--node-api", "mr2ct-api:8800"], "--node-api"), (["--node-api-ca", "/etc/hostname"], "--node-api-ca"),
                       (["--modality", "tps=TPS@nohost"], "--modality 'tps=TPS@nohost'"), (["--modality", "mr2ct=X@h:104"], "not mr2ct"),
                       (["--modality", "../x=TPS@h:104"], "--modality")):
        refused = subprocess.run([*command[:5], str(tmp_path / "other" / "other.json"), *bad], capture_output=True, text=True, timeout=60,
                                 env=run_env)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr
    assert not (tmp_path / "other").exists()

    with OrthancServer(tmp_path / "orthanc", config_file=config, extra_env=plugin_env) as orthanc:
        assert {"dicom-web", "python"} <= set(orthanc.get("/plugins"))
        assert orthanc.get("/modalities/mr2ct/configuration")["Port"] == node_port
        assert orthanc.get("/modalities/tps/configuration")["AET"] == "TPS"
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{orthanc.aet}@127.0.0.1"
        env["MR2CT_API_PORT"] = str(api_port)
        assert env["MR2CT_DATABASE_URL"] == node_database
        with NodeServer(tmp_path / "node", env, node_port):
            series = write_mr_series(tmp_path / "mr", seed=704, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
            _upload(orthanc, [f.read_bytes() for f in series.files])
            # the base config's StableAge (5 s) holds: the series goes once it has been quiet that long
            result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
            mr = next(x for x in result if x["MainDicomTags"]["Modality"] == "MR")
            deadline = time.monotonic() + 30
            while _routed_flag(orthanc, mr["ID"]) != "sent" and time.monotonic() < deadline:  # the automatic send has ended
                time.sleep(0.2)
            pressed = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr['ID']}", auth=orthanc.auth, timeout=120)
            assert pressed.status_code == 200 and pressed.json()["instances"] == 4, pressed.text  # asked of the node's API


@pytest.mark.parametrize("env, message", [
    ({"MR2CT_ROUTE_ATTEMPTS": "eight"}, "MR2CT_ROUTE_ATTEMPTS must be a whole number >= 1, got 'eight'"),
    ({"MR2CT_PENDING_PROPERTY": "5"}, "MR2CT_PENDING_PROPERTY must be a whole number from 1024 to 65535 (Orthanc's range for plugins), got '5'"),
    ({"MR2CT_NODE_API": "127.0.0.1:8800"}, "MR2CT_NODE_API must be the node's API address, e.g. http://127.0.0.1:8800, got '127.0.0.1:8800'"),
    ({"MR2CT_NODE_API": "http://127.0.0.1:8800"}, "MR2CT_NODE_API is set but MR2CT_NODE_API_TOKEN is empty"),
    ({"MR2CT_NODE_API": "https://127.0.0.1:8800", "MR2CT_NODE_API_TOKEN": "t", "MR2CT_NODE_API_CA_FILE": "/no/such/ca.pem"},
     "MR2CT_NODE_API_CA_FILE: file /no/such/ca.pem does not exist"),
    ({"MR2CT_NODE_API": "http://127.0.0.1:8800", "MR2CT_NODE_API_TOKEN": "t", "MR2CT_NODE_API_CA_FILE": "/etc/hostname"},
     "MR2CT_NODE_API_CA_FILE is set but MR2CT_NODE_API is not an https:// address"),
])
def test_a_bad_plugin_setting_stops_orthanc_naming_it(tmp_path, env, message):
    orthanc = OrthancServer(tmp_path, free_port(), free_port(), python_plugin=True, extra_env=env)
    with pytest.raises(RuntimeError, match="Orthanc exited"):
        orthanc.start(timeout=60)
    assert message in orthanc.log_path.read_text()


def test_the_synthesize_ct_button_in_orthanc_explorer_sends_the_series_and_says_so(stack, tmp_path):
    """The PACS administrator opens an MR series in Orthanc Explorer (a real headless Chromium),
    presses "Synthesize CT" and is told it was sent; the node makes a job of it. A CT series page
    has no such button."""
    orthanc, node = stack
    series = write_mr_series(tmp_path / "mr", seed=705, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    for f in series.files:
        httpx.post(f"{orthanc.url}/instances", content=f.read_bytes(), auth=orthanc.auth)
    result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
    ids = {x["MainDicomTags"]["Modality"]: x["ID"] for x in result}
    deadline = time.monotonic() + 30
    while _routed_flag(orthanc, ids["MR"]) != "sent" and time.monotonic() < deadline:  # the automatic send has ended
        time.sleep(0.2)
    alerts: list[str] = []
    with headless_chromium() as browser:
        context = browser.new_context(http_credentials={"username": orthanc.username, "password": orthanc.password})
        page = context.new_page()
        page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.accept()))
        page.goto(f"{orthanc.url}/app/explorer.html#series?uuid={ids['MR']}")
        page.locator("#mr2ct-synthesize").first.click(timeout=30_000)
        deadline = time.monotonic() + 30
        while not alerts and time.monotonic() < deadline:
            page.wait_for_timeout(200)
        ct_page = context.new_page()
        ct_page.goto(f"{orthanc.url}/app/explorer.html#series?uuid={ids['CT']}")
        ct_page.wait_for_function("document.body.innerText.includes('CT')", timeout=30_000)
        ct_page.wait_for_timeout(1500)  # the page's own script has looked at the series
        ct_buttons = ct_page.locator("#mr2ct-synthesize").count()
        # Explorer goes from one series to another by a change of hash (an address typed or
        # pasted, Back and Forward): the MR's button must not stay on the CT's page, nor come back
        # late from the MR's answer, and must return with the MR.
        page.evaluate(f"window.location.hash = 'series?uuid={ids['CT']}'")
        page.wait_for_function("document.getElementById('series-info').innerText.includes('Modality: CT')", timeout=30_000)
        page.wait_for_timeout(1500)
        buttons_after_moving_to_ct = page.locator("#mr2ct-synthesize").count()
        page.go_back()
        page.locator("#mr2ct-synthesize").first.wait_for(timeout=30_000)
        buttons_back_on_mr = page.locator("#mr2ct-synthesize").count()
    assert alerts == ["Sent to mr2ct; the synthetic CT will appear in this study."]
    assert ct_buttons == 0
    assert buttons_after_moving_to_ct == 0
    assert buttons_back_on_mr == 1
    assert _jobs_done(node, series.series_uid, 2) >= 2  # the automatic send's job, and the button's


def _outcome(orthanc: OrthancServer, series_id: str, starts: str, timeout: float = 60) -> str:
    """The node's note on the series (Mr2ctOutcome), once it says ``starts`` after its time stamp."""
    deadline = time.monotonic() + timeout
    text = None
    while time.monotonic() < deadline:
        answer = httpx.get(f"{orthanc.url}/series/{series_id}/metadata/Mr2ctOutcome", auth=orthanc.auth)
        text = answer.text if answer.status_code == 200 else None
        if text is not None and re.match(r"^mr2ct \d{4}-\d\d-\d\d \d\d:\d\d UTC: " + re.escape(starts), text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"series {series_id}'s note is {text!r} after {timeout} s")


def test_orthanc_shows_why_a_series_has_no_sct_and_which_series_is_its_sct(stack, tmp_path):
    """A post-gadolinium T1 that Orthanc routed to the node is left unsynthesized (the node's
    default select_contrast_agent): until 2026-12-06 a user of Orthanc saw "sent" and no sCT, and
    only the node's API said why. The node writes the reason on the series in Orthanc, and Orthanc
    Explorer shows it on the series page (a real headless Chromium); an unenhanced T1 beside it
    gets the note naming its sCT, the CT series Orthanc holds in its study."""
    orthanc, _ = stack
    enhanced = write_mr_series(tmp_path / "gd", seed=712, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0, contrast_agent="GADOBUTROL")
    plain = write_mr_series(tmp_path / "mr", seed=713, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
    _upload(orthanc, [f.read_bytes() for f in enhanced.files + plain.files])
    result = _wait_for(orthanc, plain.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
    ct = next(x for x in result if x["MainDicomTags"]["Modality"] == "CT")
    plain_id = next(x["ID"] for x in result if x["MainDicomTags"]["Modality"] == "MR")
    done = _outcome(orthanc, plain_id, "sCT stored in this study")
    assert f"CT series {ct['MainDicomTags']['SeriesInstanceUID']} " in done
    enhanced_id = _wait_for(orthanc, enhanced.study_uid, lambda s: len(s) == 1)[0]["ID"]
    why = _outcome(orthanc, enhanced_id, "not synthesized: its header says a contrast agent was given")
    assert "select_contrast_agent is 'without'" in why
    assert [x["MainDicomTags"]["Modality"] for x in _study_series(orthanc, enhanced.study_uid)] == ["MR"]
    with headless_chromium() as browser:
        context = browser.new_context(http_credentials={"username": orthanc.username, "password": orthanc.password})
        page = context.new_page()
        page.goto(f"{orthanc.url}/app/explorer.html#series?uuid={enhanced_id}")
        page.locator("#mr2ct-outcome").first.wait_for(timeout=30_000)
        shown = page.locator("#mr2ct-outcome").inner_text()
        page.locator("#mr2ct-routed").first.wait_for(timeout=30_000)
        routed = page.locator("#mr2ct-routed").inner_text()
        no_link = page.locator("#mr2ct-sct").count()
        page.goto(f"{orthanc.url}/app/explorer.html#series?uuid={plain_id}")
        page.locator("#mr2ct-sct").first.click(timeout=30_000)  # from the MR to its sCT
        page.wait_for_function("document.getElementById('series-info').innerText.includes('Modality: CT')", timeout=30_000)
        opened = page.evaluate("window.location.hash")
    assert shown == why
    assert routed == "routing to mr2ct: sent"
    assert no_link == 0
    assert opened == f"#series?uuid={ct['ID']}"


@pytest.mark.parametrize("route", ["rest", "c-store"])
def test_a_one_instance_series_sent_again_corrected_is_still_not_sent_back(tmp_path, route):
    """Orthanc drops a series' metadata with the series when it overwrites the series' only
    instance: a corrected re-send of a one-instance series (an enhanced multi-frame MR is one
    instance) that the node routes on lost its mark, and the plugin sent it back to the node, which
    synthesized it a third time. Until 2026-12-05 the node marked a series once per process."""
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]},
                       python_plugin=True, stable_age=1) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{SCANNER_AE},{orthanc.aet}@127.0.0.1"
        env.update(MR2CT_FORWARD_ORIGINALS="true", MR2CT_COMPLETE_ON_RELEASE="true")
        if route == "c-store":
            env["MR2CT_FORWARD_TO"] = f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
        with NodeServer(tmp_path / "node", env, node_port) as node:
            series = write_mr_series(tmp_path / "mr", seed=711, slices=1, size=48, pixel_spacing=5.0, slice_spacing=10.0)
            assert storescu(series.folder, node_port, NODE_AE, SCANNER_AE).returncode == 0
            _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
            assert _jobs_done(node, series.series_uid, 1) == 1
            time.sleep(4)  # StableAge (1 s) and then some
            corrected = pydicom.dcmread(series.files[0])
            corrected.ImageComments = "corrected at the scanner"
            corrected.save_as(series.files[0], enforce_file_format=True)
            assert storescu(series.folder, node_port, NODE_AE, SCANNER_AE).returncode == 0
            assert _jobs_done(node, series.series_uid, 2) == 2
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the corrected original reaches Orthanc
                (mr,) = [x for x in _study_series(orthanc, series.study_uid) if x["MainDicomTags"]["Modality"] == "MR"]
                held = httpx.get(f"{orthanc.url}/instances/{mr['Instances'][0]}/tags?simplify", auth=orthanc.auth).json()
                if held.get("ImageComments") == "corrected at the scanner":
                    break
                time.sleep(0.5)
            assert held.get("ImageComments") == "corrected at the scanner"
            time.sleep(5)  # StableAge and then some: a send back would have begun by now
            assert _routed_flag(orthanc, mr["ID"]) == ROUTED_BY_NODE
            assert _jobs_done(node, series.series_uid, 3, timeout=5) == 2


def test_the_button_with_the_nodes_api_synthesizes_the_series_as_orthanc_holds_it(tmp_path):
    """A radiographer deletes a slice in Orthanc (a motion-corrupted one) and presses "Synthesize
    CT". Sent by C-STORE, the node's own copy of the deleted slice went into the new sCT; with
    MR2CT_NODE_API and a requester token the plugin asks the node's POST /synthesize (here over
    HTTPS, the node's certificate checked against MR2CT_NODE_API_CA_FILE), which takes the series
    as Orthanc holds it: the sCT in Orthanc has the slices Orthanc has, and the answer says one was
    left out. A series the node will not synthesize comes back with its reason."""
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import Job
    from tests.helpers import api_token, make_pki

    node_port = free_port()
    orthanc = OrthancServer(tmp_path / "orthanc", free_port(), free_port(), modalities={"mr2ct": [NODE_AE, "127.0.0.1", node_port]},
                            python_plugin=True, stable_age=1)
    env = node_env(tmp_path / "node", node_port, orthanc)
    env["MR2CT_ALLOWED_AES"] = f"{orthanc.aet}@127.0.0.1"
    pki = make_pki(tmp_path)
    env.update(MR2CT_API_TLS_CERTIFICATE=str(pki / "server.pem"), MR2CT_API_TLS_PRIVATE_KEY=str(pki / "server.key"))
    (tmp_path / "node").mkdir()
    token = api_token(env["MR2CT_DATABASE_URL"], "requester", "orthanc")
    orthanc.extra_env = {"MR2CT_NODE_API": f"https://127.0.0.1:{env['MR2CT_API_PORT']}/", "MR2CT_NODE_API_TOKEN": token,
                         "MR2CT_NODE_API_CA_FILE": str(pki / "ca.pem")}
    with orthanc, NodeServer(tmp_path / "node", env, node_port) as node:
        series = write_mr_series(tmp_path / "mr", seed=712, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
        _upload(orthanc, [f.read_bytes() for f in series.files])
        result = _wait_for(orthanc, series.study_uid, lambda s: {"MR", "CT", "SR"} <= {x["MainDicomTags"]["Modality"] for x in s})
        mr = next(x for x in result if x["MainDicomTags"]["Modality"] == "MR")
        assert _jobs_done(node, series.series_uid, 1) == 1
        deadline = time.monotonic() + 30
        while _routed_flag(orthanc, mr["ID"]) != "sent" and time.monotonic() < deadline:  # the automatic send has ended
            time.sleep(0.2)
        last = pydicom.dcmread(series.files[-1], stop_before_pixels=True).SOPInstanceUID
        (deleted,) = httpx.post(f"{orthanc.url}/tools/lookup", content=last, auth=orthanc.auth).json()
        assert httpx.delete(f"{orthanc.url}/instances/{deleted['ID']}", auth=orthanc.auth).status_code == 200

        pressed = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{mr['ID']}", auth=orthanc.auth, timeout=120)
        assert pressed.status_code == 200, pressed.text
        answer = pressed.json()
        assert answer["instances"] == 3 and answer["set_aside"] == 1
        assert answer["message"] == (f"mr2ct job {answer['job']}: the synthetic CT of the series as Orthanc holds it (3 instances) "
                                     "will appear in this study. 1 instance the node had and Orthanc no longer holds is left out.")
        assert _jobs_done(node, series.series_uid, 2) == 2
        with init_db(env["MR2CT_DATABASE_URL"])() as session:
            job = session.get(Job, answer["job"])
            assert job.state == "done" and job.instance_count == 3
            assert session.scalars(select(Job.id).where(Job.series_instance_uid == series.series_uid)).all() == [job.id - 1, job.id]
        (ct,) = [x for x in _study_series(orthanc, series.study_uid) if x["MainDicomTags"]["Modality"] == "CT"]
        assert len(ct["Instances"]) == 3  # the sCT of the deleted slice is gone too

        # two images at one position: the node will not synthesize it, and the button says why
        stacked = write_mr_series(tmp_path / "stacked", seed=713, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0)
        payloads = []
        first = pydicom.dcmread(stacked.files[0])
        for f in stacked.files:
            ds = pydicom.dcmread(f)
            ds.ImagePositionPatient = first.ImagePositionPatient
            buffer = io.BytesIO()
            ds.save_as(buffer)
            payloads.append(buffer.getvalue())
        _upload(orthanc, payloads)
        (stacked_mr,) = _wait_for(orthanc, stacked.study_uid, lambda s: len(s) == 1 and len(s[0]["Instances"]) == 4)
        deadline = time.monotonic() + 30
        while _routed_flag(orthanc, stacked_mr["ID"]) != "sent" and time.monotonic() < deadline:
            time.sleep(0.2)
        refused = httpx.post(f"{orthanc.url}/mr2ct/synthesize/{stacked_mr['ID']}", auth=orthanc.auth, timeout=120)
        assert refused.status_code == 422, refused.text
        assert refused.text.startswith("series not synthesized: its 4 images lie at 1 position:"), refused.text
