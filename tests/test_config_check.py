"""`mr2ct config check`: a PACS administrator checks a deployment before the node takes traffic.
The node itself takes scanner traffic whatever Orthanc answers (jobs retry), so a wrong login
showed only as jobs retrying for an hour."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

from dicom_node.local_stack import free_port, start_storescp, stop_process
from tests.conftest import node_env
from tests.helpers import env_without_mr2ct


def _check(env: dict[str, str], **changes: str) -> subprocess.CompletedProcess[str]:
    run_env = env_without_mr2ct()
    run_env.update(env)
    run_env.update({f"MR2CT_{k.upper()}": v for k, v in changes.items()})
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check"], capture_output=True, text=True, env=run_env,
                          timeout=120)


def _lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each check's line by its name: 'status message'."""
    found = {}
    for line in result.stdout.splitlines():
        status, rest = line[:5].strip(), line[6:]
        name, message = rest[:12].strip(), rest[13:]
        found[name] = f"{status} {message}"
    return found


def test_a_good_deployment_passes_and_each_fault_names_its_setting(orthanc, tmp_path):
    env = node_env(tmp_path / "node", free_port(), orthanc)
    good = _check(env)
    assert good.returncode == 0, good.stdout + good.stderr
    lines = _lines(good)
    assert list(lines) == ["database", "orthanc", "from orthanc", "model", "spool", "dicom port", "api port"]
    assert all(line.startswith("ok ") for name, line in lines.items() if name != "from orthanc"), lines
    assert lines["from orthanc"].startswith("warn") and "no DICOM modality 'mr2ct'" in lines["from orthanc"]  # none declared here
    assert "login accepted" in lines["orthanc"] and "Orthanc 1." in lines["orthanc"]
    assert "SHA-256" in lines["model"] and "writable" in lines["spool"]
    assert lines["model"].endswith("trained on MR contrasts ['T1'], without a contrast agent, without fat suppression, "
                                   "body parts ['HEAD']"), lines["model"]  # the default select_body_parts: a head by its names, or none given
    assert "the node brings it to revision" in lines["database"]  # read, not migrated
    assert orthanc.password not in good.stdout + good.stderr

    wrong_login = _check(env, orthanc_password="not-the-password")
    assert wrong_login.returncode == 1
    assert _lines(wrong_login)["orthanc"].startswith("FAIL") and "HTTP 401" in _lines(wrong_login)["orthanc"]
    assert "orthanc_password" in _lines(wrong_login)["orthanc"] and "not-the-password" not in wrong_login.stdout
    assert "1 check(s) failed: orthanc" in wrong_login.stderr

    unreachable = _check(env, orthanc_url=f"http://127.0.0.1:{free_port()}", orthanc_timeout_seconds="5")
    assert unreachable.returncode == 1 and "check orthanc_url" in _lines(unreachable)["orthanc"]

    full = _check(env, spool_min_free_mb=str(2**40))
    assert full.returncode == 1 and "spool_min_free_mb" in _lines(full)["spool"]

    no_model = _check(env, model_file=str(tmp_path / "missing.safetensors"))
    assert no_model.returncode == 1 and _lines(no_model)["model"].startswith("FAIL model_file")

    # a site that widens the contrasts past what the model's card says it learned is told so (a warning: its choice)
    wider = _check(env, select_acquisition_contrasts="T1,FLUID_ATTENUATED")
    assert wider.returncode == 0 and _lines(wider)["model"].startswith("warn"), wider.stdout
    assert "select_acquisition_contrasts ['T1', 'FLUID_ATTENUATED'] lets through ['FLUID_ATTENUATED']" in _lines(wider)["model"]
    # so is one that takes post-contrast series, which the shipped model never saw
    enhanced = _check(env, select_contrast_agent="any")
    assert enhanced.returncode == 0 and _lines(enhanced)["model"].startswith("warn"), enhanced.stdout
    assert ("select_contrast_agent 'any' lets through series with a contrast agent, which the model never learned"
            in _lines(enhanced)["model"])
    fat_saturated = _check(env, select_fat_suppression="with")
    assert fat_saturated.returncode == 0 and _lines(fat_saturated)["model"].startswith("warn"), fat_saturated.stdout
    assert ("select_fat_suppression 'with' lets through series with fat suppression, which the model never learned"
            in _lines(fat_saturated)["model"])
    pelvis = _check(env, select_body_parts="HEAD,PELVIS")  # an MR-only prostate series would reach a head model
    assert pelvis.returncode == 0 and _lines(pelvis)["model"].startswith("warn"), pelvis.stdout
    assert "select_body_parts ['HEAD', 'PELVIS'] lets through ['PELVIS'], whose anatomy the model never learned" in _lines(pelvis)["model"]
    wrong_agent = _check(env, select_contrast_agent="sometimes")
    assert wrong_agent.returncode != 0 and "select_contrast_agent" in wrong_agent.stdout + wrong_agent.stderr

    # a worker reading its originals from Orthanc is told whether Orthanc will hold them (nothing routes to it here)
    from_orthanc = _check(env, originals_from="orthanc")
    assert from_orthanc.returncode == 0 and _lines(from_orthanc)["originals"].startswith("warn"), from_orthanc.stdout
    assert "Orthanc declares no modality 'mr2ct'" in _lines(from_orthanc)["originals"]
    routed = _check(env, originals_from="orthanc", forward_originals="true")
    assert _lines(routed)["originals"].startswith("ok") and "forward_originals" in _lines(routed)["originals"], routed.stdout

    with socket.socket() as taken:  # a node already running, or another program on the port
        taken.bind(("127.0.0.1", int(env["MR2CT_DICOM_PORT"])))
        taken.listen()
        busy = _check(env)
    assert busy.returncode == 0 and _lines(busy)["dicom port"].startswith("warn") and "dicom_port" in _lines(busy)["dicom port"]


def test_the_routing_destination_is_asked_for_a_c_echo(orthanc, tmp_path):
    env = node_env(tmp_path / "node", free_port(), orthanc)
    port = free_port()
    (tmp_path / "archive").mkdir()
    archive = start_storescp(tmp_path / "archive", port, "ARCHIVE")
    try:
        answered = _check(env, forward_originals="true", forward_to=f"ARCHIVE@127.0.0.1:{port}")
    finally:
        stop_process(archive)
    assert answered.returncode == 0 and _lines(answered)["routing"] == f"ok forward_to ARCHIVE@127.0.0.1:{port} answered C-ECHO"
    silent = _check(env, forward_originals="true", forward_to=f"ARCHIVE@127.0.0.1:{free_port()}")
    assert silent.returncode == 1 and _lines(silent)["routing"].startswith("FAIL forward_to")


def test_what_orthanc_routes_to_the_node_is_checked_against_the_nodes_settings(orthanc, tmp_path):
    """Orthanc's routing plugin sends to its modality `mr2ct`: a port that is not the node's, or an
    Orthanc AE title the node's allow-list lacks, and every routed series never arrives or is
    refused, seen only in Orthanc's log. The check names the setting."""
    port = free_port()
    env = node_env(tmp_path / "node", port, orthanc)  # allowed_aes: the test scanner and echoscu, not Orthanc
    modality = f"{orthanc.url}/modalities/mr2ct"
    try:
        assert httpx.put(modality, json={"AET": "MR2CT", "Host": "127.0.0.1", "Port": port}, auth=orthanc.auth).status_code == 200
        refused = _check(env)
        assert refused.returncode == 1
        line = _lines(refused)["from orthanc"]
        assert line.startswith("FAIL") and f"allowed_aes does not list Orthanc's AE title '{orthanc.aet}'" in line
        accepted = _check(env, allowed_aes=f"{env['MR2CT_ALLOWED_AES']},{orthanc.aet}")
        assert accepted.returncode == 0 and _lines(accepted)["from orthanc"].startswith("ok"), accepted.stdout
        elsewhere = _check(env, allowed_aes="", dicom_port=str(free_port()))
        assert elsewhere.returncode == 1 and f"it sends to port {port}, the node listens on dicom_port" in _lines(elsewhere)["from orthanc"]
        called = _check(env, allowed_aes="", check_called_ae="true", ae_title="OTHER")
        assert called.returncode == 1 and "it calls AE title 'MR2CT'" in _lines(called)["from orthanc"]
    finally:
        httpx.delete(modality, auth=orthanc.auth)


def test_a_node_started_with_a_wrong_orthanc_login_says_so_at_once_and_keeps_serving(node_factory, tmp_path):
    """Nobody runs the check before every start: `mr2ct serve` says at start-up, naming the
    setting, what Orthanc answered, and takes traffic all the same (its jobs retry)."""
    from dicom_node.local_stack import echoscu
    from tests.conftest import NODE_AE

    node = node_factory(orthanc_password="not-the-password")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "start-up check orthanc" not in node.log_path.read_text():
        time.sleep(0.3)
    logged = node.log_path.read_text()
    assert "WARNING" in logged and "refused the login (HTTP 401): check orthanc_username and orthanc_password" in logged
    assert "not-the-password" not in logged
    assert echoscu(node.port, NODE_AE, "ECHOSCU").returncode == 0


def test_the_admin_apis_https_is_checked_and_plain_http_beyond_loopback_is_warned_of(orthanc, tmp_path):
    """Bearer tokens over plain HTTP beyond loopback cross the network in clear: the check warns;
    with api_tls_certificate and key it says they load, and a certificate that does not load
    fails naming the settings; one without the other stops the command naming both."""
    from tests.helpers import make_pki

    pki = make_pki(tmp_path)
    env = node_env(tmp_path / "node", free_port(), orthanc)
    assert "api tls" not in _lines(_check(env))  # loopback, plain: nothing to say
    beyond = _check(env, api_host="0.0.0.0")
    assert beyond.returncode == 0 and _lines(beyond)["api tls"].startswith("warn") and "in clear" in _lines(beyond)["api tls"]
    https = _check(env, api_host="0.0.0.0", api_tls_certificate=str(pki / "server.pem"), api_tls_private_key=str(pki / "server.key"))
    assert https.returncode == 0 and _lines(https)["api tls"].startswith("ok"), https.stdout
    wrong = _check(env, api_tls_certificate=str(pki / "client.key"), api_tls_private_key=str(pki / "server.key"))  # a key for a certificate
    assert wrong.returncode == 1 and _lines(wrong)["api tls"].startswith("FAIL api_tls_certificate / api_tls_private_key"), wrong.stdout
    alone = _check(env, api_tls_certificate=str(pki / "server.pem"))
    assert alone.returncode == 2 and "api_tls_certificate and api_tls_private_key must be set together" in alone.stderr
