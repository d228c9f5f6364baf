"""`mr2ct qa`: a phantom head with a known CT goes through a running node as a scanner's MR series;
the sCT is read back from Orthanc and scored; a figure above --max-mae-hu fails the run; each run is
an audit row and the QA study leaves Orthanc."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from dicom_node.db import init_db
from dicom_node.local_stack import NodeServer, OrthancServer, free_port
from dicom_node.models import AuditEvent
from tests.conftest import NODE_AE, SCANNER_AE, node_env
from tests.helpers import api_token, env_without_mr2ct


def test_qa_scores_the_sct_of_a_phantom_sent_through_the_node(tmp_path):
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{SCANNER_AE},MR2CT_QA"
        with NodeServer(tmp_path / "node", env, node_port) as node:
            run_env = env_without_mr2ct() | env

            def qa(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "dicom_node.cli", "qa", "--node", f"{NODE_AE}@127.0.0.1:{node.port}",
                                       "--slices", "6", "--size", "128", "--pixel-spacing", "2", "--timeout", "180", "--json", *args],
                                      capture_output=True, text=True, env=run_env, timeout=300)

            good = qa()
            assert good.returncode == 0, good.stderr
            figures = json.loads(good.stdout.strip().splitlines()[-1])
            # computed from the images: a phantom head at 2 mm through one view reads ~100-200 HU; an
            # sCT of the wrong slices, or all water, reads far more
            assert 20 < figures["mae_hu"] < 400 and figures["passed"] and figures["body_pixels"] > 10_000, figures
            assert {"cortical bone", "white matter", "csf"} <= set(figures["mae_by_tissue"])
            assert figures["mae_by_tissue"]["white matter"] < figures["mae_by_tissue"]["cortical bone"]
            # the interlock beside it: a FLAIR series the node must not synthesize, and did not
            assert figures["contrast_interlock"]["contrast"] == "FLUID_ATTENUATED" and figures["contrast_interlock"]["refused"] is True
            assert "contrast interlock: the FLUID_ATTENUATED series was left unsynthesized" in good.stdout
            # and a post-contrast and a fat-saturated T1, which the node (taking neither, by default) must not synthesize either
            for key, what in (("contrast_agent_interlock", "post-contrast T1"), ("fat_suppression_interlock", "fat-saturated T1")):
                assert figures[key]["series"] == what and figures[key]["refused"] is True, figures[key]
            assert "contrast agent interlock: the post-contrast T1 series was left unsynthesized" in good.stdout
            assert "fat suppression interlock: the fat-saturated T1 series was left unsynthesized" in good.stdout
            assert orthanc.get("/studies") == [], "the QA study was left in Orthanc"
            strict = qa("--max-mae-hu", "1")
            assert strict.returncode == 1 and "above --max-mae-hu 1" in strict.stderr, strict.stderr
            with init_db(env["MR2CT_DATABASE_URL"])() as session:
                runs = session.query(AuditEvent).filter(AuditEvent.action == "qa-run").order_by(AuditEvent.id).all()
            assert [r.outcome for r in runs] == ["success", "failure"] and runs[0].detail["mae_hu"] == figures["mae_hu"]
            refused = qa("--calling-ae", "STRANGER")
            assert refused.returncode == 1 and "STRANGER not in the node's allowed_aes" in refused.stderr, refused.stderr
            # what an alert watches: the last run failed; the last MAE measured is the good run's
            auditor = {"Authorization": f"Bearer {api_token(env['MR2CT_DATABASE_URL'], 'auditor', 'qa')}"}
            metrics = httpx.get(f"http://127.0.0.1:{env['MR2CT_API_PORT']}/metrics", headers=auditor, timeout=10).text.splitlines()
            assert "mr2ct_qa_passed 0" in metrics and f"mr2ct_qa_mae_hu {figures['mae_hu']:g}" in metrics, metrics


def test_qa_fails_when_the_node_synthesizes_the_contrast_it_must_leave(tmp_path):
    """The contrast interlock: a node that makes an sCT of a FLAIR series (here configured to, as a
    node from before 2026-12-05 did whatever its configuration) fails the QA, whatever the T1's MAE;
    the sCT it made of the interlock series leaves Orthanc with the QA's."""
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env["MR2CT_ALLOWED_AES"] = f"{SCANNER_AE},MR2CT_QA"
        run_env = env_without_mr2ct() | env  # the QA expects the default: T1 only
        env["MR2CT_SELECT_ACQUISITION_CONTRASTS"] = "T1,FLUID_ATTENUATED"
        with NodeServer(tmp_path / "node", env, node_port) as node:
            result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "qa", "--node", f"{NODE_AE}@127.0.0.1:{node.port}",
                                     "--slices", "4", "--size", "64", "--pixel-spacing", "4", "--timeout", "180", "--json"],
                                    capture_output=True, text=True, env=run_env, timeout=300)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "FAILED: the node did not leave the FLUID_ATTENUATED interlock series unsynthesized" in result.stderr, result.stderr
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            assert figures["contrast_interlock"]["refused"] is False and not figures["passed"]
            assert figures["contrast_agent_interlock"]["refused"] is True  # the other interlocks held
            assert orthanc.get("/studies") == [], "the interlock's sCT was left in Orthanc"
            with init_db(env["MR2CT_DATABASE_URL"])() as session:
                (run,) = session.query(AuditEvent).filter(AuditEvent.action == "qa-run").all()
            assert run.outcome == "failure" and run.detail["contrast_interlock"]["refused"] is False


def test_qa_speaks_dicom_over_tls_to_a_node_that_asks_for_it(tmp_path):
    from tests.helpers import make_pki

    pki = make_pki(tmp_path)
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc", free_port(), free_port()) as orthanc:
        env = node_env(tmp_path / "node", node_port, orthanc)
        env.update(MR2CT_ALLOWED_AES="MR2CT_QA", MR2CT_TLS_CERTIFICATE=str(pki / "server.pem"),
                   MR2CT_TLS_PRIVATE_KEY=str(pki / "server.key"), MR2CT_TLS_CA_FILE=str(pki / "ca.pem"))
        with NodeServer(tmp_path / "node", env, node_port) as node:
            run_env = env_without_mr2ct() | env
            base = [sys.executable, "-m", "dicom_node.cli", "qa", "--node", f"{NODE_AE}@127.0.0.1:{node.port}", "--slices", "4",
                    "--size", "128", "--pixel-spacing", "2", "--timeout", "180"]
            plain = subprocess.run(base, capture_output=True, text=True, env=run_env, timeout=300)
            assert plain.returncode == 1 and "use --tls" in plain.stderr, plain.stderr
            over_tls = subprocess.run([*base, "--tls"], capture_output=True, text=True, env=run_env, timeout=300)
            assert over_tls.returncode == 0 and "sCT MAE" in over_tls.stdout, over_tls.stderr


def test_the_interlocks_follow_what_the_node_keeps_out_and_their_headers_say_it(tmp_path):
    """Each interlock series is sent only while the node's settings keep its kind out, and its header
    reads as that kind by the node's own rules (a QA whose interlock the node would take anyway
    would prove nothing)."""
    import pydicom

    from dicom_node.ingest import SelectionRules
    from dicom_node.qa import INTERLOCK_KEYS, _write_interlock, interlocks
    from dicom_node.settings import Settings
    from synthesis.contrast import contrast, contrast_agent, fat_suppression

    sent, unchecked = interlocks(SelectionRules.from_settings(Settings()))
    assert [check.key for check in sent] == list(INTERLOCK_KEYS) and unchecked == {}
    told = {}
    for check in sent:
        first = pydicom.dcmread(_write_interlock(tmp_path / check.key, check, 7).files[0])
        told[check.key] = (contrast(first)[0], contrast_agent(first)[0], fat_suppression(first)[0])
    assert told == {"contrast_interlock": ("FLUID_ATTENUATED", "WITHOUT", "WITHOUT"),
                    "contrast_agent_interlock": ("T1", "WITH", "WITHOUT"), "fat_suppression_interlock": ("T1", "WITHOUT", "WITH")}
    sent, unchecked = interlocks(SelectionRules.from_settings(Settings(select_acquisition_contrasts="", select_contrast_agent="any")))
    assert [check.key for check in sent] == ["fat_suppression_interlock"]
    assert unchecked == {"contrast_interlock": "not checked: select_acquisition_contrasts takes every contrast",
                         "contrast_agent_interlock": "not checked: select_contrast_agent is 'any'"}
