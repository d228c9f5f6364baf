"""A site promotes a model it trained on its own series, and the node's selection follows it
(select_follow_model): what the node synthesizes is what the running model's card says it learned,
from the next series on, without an edit of the config or a restart."""

from __future__ import annotations

import subprocess
import sys

import httpx
import torch
from sqlalchemy import select

from dicom_node.db import init_db
from dicom_node.demo import wait_for_job
from dicom_node.ingest import SelectionRules
from dicom_node.local_stack import storescu
from dicom_node.models import AuditEvent, Job, Series
from synthesis.card import selection_learned
from synthesis.contrast import EXAMPLE_TIMINGS
from synthesis.model_file import default_model_path, load_model, save_model
from synthesis.networks import ResnetGenerator
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import env_without_mr2ct, series_once_complete
from training.phantom_dicom import write_mr_series


def test_a_card_gives_the_selection_it_learned_and_leaves_unknown_and_what_it_does_not_say_to_the_settings() -> None:
    card = {"mr_contrasts": ["T1", "T2", "UNKNOWN"], "mr_contrast_agents": ["WITHOUT", "WITH"], "mr_fat_suppression": ["WITHOUT"],
            "mr_body_parts": ["BRAIN", "UNKNOWN"]}
    assert selection_learned(card) == {"select_acquisition_contrasts": ["T1", "T2"], "select_contrast_agent": "any",
                                       "select_fat_suppression": "without", "select_body_parts": ["BRAIN", "HEAD", "SKULL"]}
    assert set(selection_learned({}).values()) == {None}  # a card made before these keys: nothing taken

    settings = SelectionRules(contrasts=("T1", "UNKNOWN"), body_parts=("HEAD", "UNKNOWN"), fat_suppression="with")
    followed = settings.following({**card, "mr_fat_suppression": []}, "model 'm'")
    assert followed.contrasts == ("T1", "T2", "UNKNOWN") and followed.body_parts == ("BRAIN", "HEAD", "SKULL", "UNKNOWN")
    assert followed.contrast_agent == "any" and followed.fat_suppression == "with"  # the card does not say: the setting's
    assert followed.followed == {"select_acquisition_contrasts", "select_contrast_agent", "select_body_parts"}
    strict = SelectionRules(contrasts=("T1",), body_parts=("HEAD",)).following(card, "model 'm'")
    assert "UNKNOWN" not in strict.contrasts and "UNKNOWN" not in strict.body_parts  # UNKNOWN is the site's to vouch for
    assert SelectionRules(contrasts=(), body_parts=()).following(card, "m").contrasts == ("T1", "T2", "UNKNOWN")  # any: UNKNOWN too


def _cli(node, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_without_mr2ct()
    env.update(MR2CT_DATABASE_URL=node.database_url, MR2CT_SELECT_FOLLOW_MODEL="true")
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_activating_a_model_that_learned_t2_makes_the_node_synthesize_t2_without_a_restart(node_factory, tmp_path):
    node = node_factory(select_follow_model="true")
    sessions = init_db(node.database_url)

    def t2(name: str, seed: int):
        return write_mr_series(tmp_path / name, seed=seed, slices=4, size=48, pixel_spacing=5.0, slice_spacing=10.0,
                               mr_timing=EXAMPLE_TIMINGS["T2"], series_description=name)

    token = _cli(node, "tokens", "create", "--role", "auditor", "--name", "pacs-admin").stdout.strip()
    selection_url = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/selection"

    def selection() -> dict:
        answer = httpx.get(selection_url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()

    shipped = default_model_path().name
    now = selection()  # what the node synthesizes, and from whose card
    assert now["contrasts"] == ["T1"] and now["follows"] == f"model_file {shipped!r}" and now["modalities"] == ["MR"]
    assert now["followed"] == ["select_acquisition_contrasts", "select_body_parts", "select_contrast_agent", "select_fat_suppression"]
    assert httpx.get(selection_url, timeout=30).status_code == 401

    before = t2("t2_before", 1501)
    assert storescu(before.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    row = series_once_complete(node.database_url, before.series_uid)
    assert row.state == "ignored" and row.reason_code == "contrast" and f"not one of the MR contrasts model_file {shipped!r} learned (select_follow_model) ['T1']" \
        in row.reason, row.reason

    run = tmp_path / "site-t1t2"
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k != "sha256"}
    card.update(name="site-t1t2", mr_contrasts=["T1", "T2"])
    torch.manual_seed(15)
    new = save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    assert _cli(node, "models", "register", str(run)).returncode == 0
    activated = _cli(node, "models", "activate", new["sha256"][:12])
    assert activated.returncode == 0, activated.stderr
    assert "warning" not in activated.stderr and "selection: from the next series on, trained on MR contrasts ['T1', 'T2']" \
        in activated.stdout, activated.stdout + activated.stderr
    checked = _cli(node, "config", "check")
    model_line = next(line for line in checked.stdout.splitlines() if line.split()[1:2] == ["model"])
    assert model_line.startswith("ok") and "the node's selection follows its card (select_follow_model)" in model_line, model_line

    assert selection()["contrasts"] == ["T1", "T2"] and selection()["follows"] == f"the active model 'site-t1t2' ({new['sha256'][:12]})"
    with httpx.Client(base_url=f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}", timeout=30) as browser:  # the dashboard says it too
        assert browser.post("/dashboard/login", data={"token": token}).status_code == 303
        page = browser.get("/dashboard").text
    assert "Synthesized now: MR contrasts T1, T2; contrast agent without; fat suppression without; body parts HEAD, BRAIN, SKULL, " \
        f"UNKNOWN (from the card of the active model &#x27;site-t1t2&#x27; ({new['sha256'][:12]}), select_follow_model)" in page, page

    after = t2("t2_after", 1502)
    assert storescu(after.folder, node.port, NODE_AE, SCANNER_AE).returncode == 0
    job = wait_for_job(node.database_url, after.series_uid, timeout=120)
    assert job.state == "done" and job.model_sha256 == new["sha256"]
    log = node.log_path.read_text()
    assert f"selection follows the active model 'site-t1t2' ({new['sha256'][:12]}): contrasts=['T1', 'T2']" in log
    with sessions() as session:  # set aside before the activation: stays so until judged again
        assert session.get(Series, before.series_uid).state == "ignored"
        assert not session.scalars(select(Job).where(Job.series_instance_uid == before.series_uid)).all()

    # the administrator judges what the old card kept out again, by the rules as they stand now
    admin = {"Authorization": f"Bearer {_cli(node, 'tokens', 'create', '--role', 'admin', '--name', 'pacs').stdout.strip()}"}
    rejudge_url = f"http://127.0.0.1:{node.env['MR2CT_API_PORT']}/series/rejudge"
    assert httpx.post(rejudge_url, json={"reason_code": "contrast"}, headers={"Authorization": f"Bearer {token}"}).status_code == 403
    refused = httpx.post(rejudge_url, json={"reason_code": "planes"}, headers=admin, timeout=30)
    assert refused.status_code == 422 and "not a rule a series can be judged again by" in refused.json()["detail"]
    assert httpx.post(rejudge_url, json={}, headers=admin, timeout=30).status_code == 422
    dry = _cli(node, "series", "rejudge", "--reason-code", "contrast", "--dry-run")
    assert dry.returncode == 0 and f"{before.series_uid}: would be synthesized" in dry.stdout, dry.stdout + dry.stderr
    assert "dry run: 1 would be synthesized, nothing changed" in dry.stdout
    assert series_once_complete(node.database_url, before.series_uid).state == "ignored"
    bad = _cli(node, "series", "rejudge", "1.2.abc")
    assert bad.returncode == 2 and "not valid UIDs" in bad.stderr, bad.stderr
    answer = httpx.post(rejudge_url, json={"reason_code": "contrast", "series_uids": ["1.2.3.4.5"]}, headers=admin, timeout=60).json()
    items = {item["series_uid"]: item for item in answer["items"]}
    assert answer["judged"] == 1 and answer["synthesized"] == 1 and items["1.2.3.4.5"]["not_judged"] == "the node holds no such series"
    judged = wait_for_job(node.database_url, before.series_uid, timeout=120)
    assert judged.id == items[before.series_uid]["job_id"] and judged.state == "done" and judged.model_sha256 == new["sha256"]
    again = _cli(node, "series", "rejudge", before.series_uid)  # no longer set aside: nothing to judge
    assert again.returncode == 0 and "not judged: it is stable, not set aside" in again.stdout, again.stdout
    with sessions() as session:
        assert session.scalars(select(AuditEvent).where(AuditEvent.action == "series-rejudged")).first().detail["synthesized"] == 1


def test_the_qa_interlocks_hold_the_node_to_what_the_followed_card_keeps_out() -> None:
    """`mr2ct qa` sends a series the node must leave out for each kind its selection keeps out: with
    select_follow_model, what the running model's card keeps out, and it says whose rule let the
    others through."""
    from dicom_node.qa import interlocks

    card = {"mr_contrasts": ["T1"], "mr_contrast_agents": ["WITHOUT", "WITH"], "mr_fat_suppression": ["WITHOUT"]}
    sent, unchecked = interlocks(SelectionRules(contrast_agent="without").following(card, "model 'gd'"))
    assert [check.key for check in sent] == ["contrast_interlock", "fat_suppression_interlock"]
    assert unchecked == {"contrast_agent_interlock": "not checked: the card of model 'gd' (select_follow_model) is 'any'"}


def test_a_series_whose_originals_retention_deleted_is_not_judged_again_unless_the_workers_read_orthanc(tmp_path):
    """Judging again makes a job only of a series whose originals a worker can still read: one
    whose spool retention deleted them is named with what to do instead, unless the workers read
    originals from Orthanc (originals_from = orthanc)."""
    from pathlib import Path

    from sqlalchemy import update

    from dicom_node.ingest import ReceivedInstance, mark_stable
    from dicom_node.models import Instance, utcnow
    from dicom_node.recorder import SpooledInstance, record_batch
    from dicom_node.worker import rejudge

    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    info = ReceivedInstance("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4.1", "1.2.3", "1.2.3.4", "MR", "t2", "axial", "patient", contrast="T2",
                            contrast_source="TR 4000 ms, TE 100 ms")
    record_batch(sessions, [SpooledInstance(info, Path("/spool/1.dcm"), 100, "1.2.840.10008.1.2.1", SCANNER_AE, None, utcnow())])
    assert mark_stable(sessions, "1.2.3.4", 0) == ("ignored", None)  # the default rules: T1 only
    with sessions.begin() as session:
        session.execute(update(Instance).values(purged_at=utcnow()))
    t2 = SelectionRules(contrasts=("T1", "T2"))
    [item] = rejudge(sessions, t2, "test", ["1.2.3.4"])["items"]
    assert item["not_judged"].startswith("spool retention deleted 1 of its originals: send the series again")
    answer = rejudge(sessions, t2, "test", reason_code="contrast", originals_from_orthanc=True)
    assert answer["synthesized"] == 1 and answer["items"][0]["state"] == "stable"


def test_the_selection_stays_that_of_the_last_model_named_when_the_registry_cannot_be_read(tmp_path, caplog):
    """A registry that cannot be read (its database gone, or being migrated) does not throw the node
    back onto the settings' rules: the rules stay those of the last model the registry named, logged."""
    from sqlalchemy import text

    from dicom_node.registry import FollowedSelection, activate, register

    sessions = init_db(f"sqlite:///{tmp_path / 'mr2ct.db'}")
    run = tmp_path / "site-t2"
    card = {k: v for k, v in load_model(default_model_path()).card.items() if k != "sha256"}
    card.update(name="site-t2", mr_contrasts=["T2"])
    torch.manual_seed(16)
    save_model(run / "model.safetensors", ResnetGenerator(ngf=16, n_blocks=6), card)
    row, _ = register(sessions, run)
    activate(sessions, str(row.id))
    follow = FollowedSelection(sessions, SelectionRules(), default_model_path())
    assert follow().contrasts == ("T2",)
    with sessions.begin() as session:
        session.execute(text("ALTER TABLE models RENAME TO models_moved"))
    assert follow().contrasts == ("T2",) and "cannot read the registry's active model" in caplog.text
