"""Small helpers shared by tests: Orthanc look-ups, dciodvfy, admin API tokens, the admin API served on a database of a test's own,
a DICOMweb proxy that counts requests."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import requests
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db import init_db
from dicom_node.local_stack import OrthancServer
from dicom_node.models import AuditEvent, Series

# Debian's dicom3tools (1.00~20220618) predates Synthetic Data (0008,001C), added to
# PS3.6 later; its dictionary reports the standard tag as unknown. Only this line is
# set aside, and tests print it; any other Error line fails.
KNOWN_STALE_DICTIONARY_ERRORS = ("(0x0008,0x001c)",)


def study_series(orthanc: OrthancServer, study_uid: str) -> list[dict]:
    lookup = httpx.post(f"{orthanc.url}/tools/lookup", content=study_uid, auth=orthanc.auth, timeout=30).json()
    study_ids = [r["ID"] for r in lookup if r["Type"] == "Study"]
    assert len(study_ids) == 1, f"study {study_uid} not in Orthanc"
    return orthanc.get(f"/studies/{study_ids[0]}/series")


def series_datasets(orthanc: OrthancServer, series: dict) -> list[Dataset]:
    out = []
    for instance_id in series["Instances"]:
        raw = httpx.get(f"{orthanc.url}/instances/{instance_id}/file", auth=orthanc.auth, timeout=30).content
        out.append(pydicom.dcmread(BytesIO(raw)))
    return out


def dciodvfy(path: Path) -> tuple[list[str], list[str], list[str]]:
    """Run dciodvfy; return (errors, set-aside stale-dictionary errors, warnings)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [l for l in lines if l.startswith("Error")]
    stale = [l for l in errors if any(tag in l for tag in KNOWN_STALE_DICTIONARY_ERRORS)]
    warnings = [l for l in lines if l.startswith("Warning")]
    return [e for e in errors if e not in stale], stale, warnings


def dcentvfy(paths: list[Path]) -> tuple[list[str], list[str]]:
    """Run dcentvfy (dicom3tools) over instances that should describe the same patient, study,
    series and frame of reference alike; return (errors, warnings)."""
    result = subprocess.run(["dcentvfy", *map(str, paths)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


def audit_events(database_url: str, matching: Callable[[AuditEvent], bool], timeout: float = 15.0) -> list[AuditEvent]:
    """The audit events that ``matching`` accepts, waiting up to ``timeout`` for the first: the
    node writes some after its answer has left (pynetdicom sends an A-ASSOCIATE-RJ before its
    EVT_REJECTED handlers run), so a client that has its answer may look before the row is there."""
    sessions = init_db(database_url)
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            found = [e for e in session.scalars(select(AuditEvent)).all() if matching(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def as_ge(ds: Dataset, code: int) -> Dataset:
    """``ds`` as a GE scanner writes it: ImageType ORIGINAL\\PRIMARY\\OTHER whatever the complex
    component, which is in the private element (0043,xx2F) of GEMS_PARM_01 (0 magnitude, 1 phase,
    2 real, 3 imaginary), in the first free block of group 0043."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x2F, "SS", code)
    return ds


def rewrite_as_ge(paths: list[Path], code: int) -> None:
    """``as_ge`` on each file of a series, in place."""
    for path in paths:
        as_ge(pydicom.dcmread(path), code).save_as(path)


def c_store(port: int, called_ae: str, calling_ae: str, datasets: list[Dataset]) -> list[int]:
    """Send data sets to a node in one association, as a scanner would (pynetdicom sends what it is
    given, an instance without Pixel Data too, which storescu will not); their C-STORE statuses."""
    from pydicom.uid import MRImageStorage
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def series_once_complete(database_url: str, series_uid: str, timeout: float = 60.0) -> Series | None:
    """The node's row of a series once it is no longer receiving (a job made, or set aside), or as
    it stands when the time is up."""
    sessions = init_db(database_url)
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as session:
            row = session.get(Series, series_uid)
        if (row is not None and row.state != "receiving") or time.monotonic() > deadline:
            return row
        time.sleep(0.3)


def env_without_mr2ct() -> dict[str, str]:
    """This process's environment less every MR2CT_* variable: what a child process (the CLI, a node)
    starts from, so that it reads its own settings and none of the test run's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MR2CT_")}


def tokens_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`mr2ct tokens ARGS` against a node's database, as an administrator runs it."""
    env = env_without_mr2ct() | {"MR2CT_DATABASE_URL": database_url}
    return subprocess.run([sys.executable, "-m", "dicom_node.cli", "tokens", *args], capture_output=True, text=True, env=env, timeout=60)


HEAVY_PACKAGES = ("torch", "pydicom", "fastapi", "highdicom")


def cli_with_imports(*args: object, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`mr2ct ARGS` as the console script runs it, and which of HEAVY_PACKAGES it had imported by the
    time it stopped (what its user waited on): the answer with its stdout less that last line."""
    probe = ("import sys\nfrom dicom_node.cli import app\ntry:\n    app(sys.argv[1:])\nfinally:\n"
             f"    print(sorted(m for m in {HEAVY_PACKAGES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    *lines, loaded = done.stdout.splitlines() or ["(nothing printed)"]
    assert loaded.startswith("["), f"mr2ct {args}: no list of imports at the end of its stdout: {loaded!r}"
    done.stdout = "".join(f"{line}\n" for line in lines)
    return done, ast.literal_eval(loaded)


def api_token(database_url: str, role: str, name: str) -> str:
    """A fresh admin API token, made with the CLI as an administrator would."""
    result = tokens_cli(database_url, "create", "--role", role, "--name", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (what a user's browser does); closed after."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(chromium).exists(), "Debian's chromium is not installed: run deploy/local/install.sh"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
        ])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def served_api(sessions: sessionmaker[Session], tokens: dict[str, str], **app_options: Any) -> Iterator[str]:
    """The real admin API app (uvicorn, loopback, a free port) on ``sessions``' database, with the
    bearer tokens ``tokens`` (token -> role) in it, and no node beside it: rows a test wrote are
    what it serves, and no worker moves a job on (``app_options``: create_app's, an Orthanc, a
    spool). Yields its base URL; stops it after."""
    import uvicorn

    from dicom_node.api.app import create_app
    from dicom_node.tokens import digest
    from dicom_node.local_stack import free_port
    from dicom_node.models import ApiToken

    with sessions.begin() as session:
        for n, (token, role) in enumerate(tokens.items()):
            session.add(ApiToken(name=f"test-{role}-{n}", role=role, token_sha256=digest(token)))
    server = uvicorn.Server(uvicorn.Config(create_app(sessions, **app_options), host="127.0.0.1", port=free_port(), log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "the admin API did not start within 30 s"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        serving.join(timeout=10)


@contextmanager
def dicomweb_proxy(orthanc: OrthancServer, refuse_stored_syntax: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
    """Orthanc's DICOMweb behind a loopback HTTP proxy: its URL, the paths asked of it, and the
    ones it refused: with ``refuse_stored_syntax`` it answers 406 Not Acceptable to
    transfer-syntax=*, as some DICOMweb servers do."""
    asked: list[str] = []
    refused: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            asked.append(self.path)
            accept = self.headers.get("Accept", "")
            if refuse_stored_syntax and "transfer-syntax=*" in accept:
                refused.append(self.path)
                self.send_response(406)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            upstream = requests.get(f"{orthanc.url}{self.path}", headers={"Accept": accept}, auth=orthanc.auth, timeout=30)
            self.send_response(upstream.status_code)
            self.send_header("Content-Type", upstream.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(upstream.content)))
            self.end_headers()
            self.wfile.write(upstream.content)

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{proxy.server_address[1]}/dicom-web", asked, refused
    finally:
        proxy.shutdown()
        proxy.server_close()
        serving.join(timeout=10)


def metadata_asked(asked: list[str]) -> list[str]:
    """The series whose instance metadata a pull asked for (whether a CT is synthetic)."""
    return [path.split("/series/")[1].split("/")[0] for path in asked if path.endswith("/metadata")]


def shipped_weights_with_views(folder: Path, views: str) -> Path:
    """A copy of the shipped model in ``folder`` whose card runs it with ``views`` (the same
    weights and SHA-256; e.g. one view standing in for an older model)."""
    import json
    import shutil

    from synthesis.model_file import card_path_for, default_model_path

    weights = default_model_path()
    folder.mkdir()
    shutil.copy(weights, folder / "model.safetensors")
    card = json.loads(card_path_for(weights).read_text())
    (folder / "model.json").write_text(json.dumps({**card, "test_time_augmentation": views}))
    return folder


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(tmp_path: Path) -> Path:
    """A test CA and two certificates it signed (server, client), both for 127.0.0.1."""
    folder = tmp_path / "pki"
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=mr2ct test CA", cwd=folder)
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)
    return folder


@contextmanager
def syslog_repository(folder: Path, *, tls: Path | None = None, port: int | None = None, relp: bool = False) -> Iterator[tuple[int, Path]]:
    """rsyslogd (Debian's, a real syslog server, as sites run to receive or relay audit messages)
    listening on 127.0.0.1 for RFC 5424 messages: over TLS with client certificates checked
    against ``tls``'s test CA (``make_pki``'s folder), else plain TCP (octet-counted); with
    ``relp``, by RELP (its imrelp module, in TLS with ``tls``); each message's MSGID and MSG
    written as one line of the file it yields with its port. Stopped at the end."""
    import shutil

    from dicom_node.local_stack import free_port, stop_process, wait_listening

    binary = shutil.which("rsyslogd")
    if binary is None:
        raise RuntimeError("rsyslogd is not installed; run deploy/local/install.sh")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    received = folder / "received.log"
    received.touch()
    driver = ""
    stream = ""
    if tls is not None:
        ca, certificate, key = tls / "ca.pem", tls / "server.pem", tls / "server.key"
        driver = (f' DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{ca}"'
                  f' DefaultNetstreamDriverCertFile="{certificate}" DefaultNetstreamDriverKeyFile="{key}"')
        stream = ' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid"'
    config = folder / "rsyslog.conf"
    listen = f'module(load="imtcp"{stream})\ninput(type="imtcp" port="{port}" address="127.0.0.1")\n'
    if relp:
        secured = (f' tls="on" tls.caCert="{tls / "ca.pem"}" tls.myCert="{tls / "server.pem"}" tls.myPrivKey="{tls / "server.key"}"'
                   ' tls.authMode="certvalid"') if tls is not None else ""
        driver, listen = "", f'module(load="imrelp")\ninput(type="imrelp" port="{port}" address="127.0.0.1"{secured})\n'
    config.write_text(
        f'global(workDirectory="{folder}" maxMessageSize="64k"{driver})\n'
        + listen +
        'template(name="audit" type="string" string="%msgid% %msg%\\n")\n'
        f'action(type="omfile" file="{received}" template="audit")\n'
    )
    with open(folder / "rsyslogd.err", "wb") as errors:
        proc = subprocess.Popen([binary, "-n", "-f", str(config), "-i", str(folder / "rsyslogd.pid")], stdout=subprocess.DEVNULL,
                                stderr=errors)
    try:
        wait_listening(proc, port)
        yield port, received
    finally:
        stop_process(proc)


def syslog_messages(received: Path, count: int, timeout: float = 30.0) -> list[str]:
    """The audit messages (the XML of each) a ``syslog_repository`` has written, once it holds at least ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line.split(" ", 1)[1].lstrip("\ufeff") for line in received.read_text(encoding="utf-8").splitlines()
                 if line.startswith("IHE+RFC-3881 ")]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something true (returned), or fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance of Storage Commitment Push


@contextmanager
def commitment_peer(port: int, ae_title: str, lose: Callable[[list[list[str]]], list[str] | None], *,
                    report_to: tuple[int, str] | None = None, on_request_association: bool = False,
                    storage: Any = None) -> Iterator[dict[str, list]]:
    """A DICOM peer (pynetdicom) that stores anything of ``storage`` (every storage SOP class by
    default) and answers storage commitment, as archives and planning systems do. For each request,
    ``lose(requests)`` (every request's SOP Instance UIDs so far, this one last) names the instances
    its report says failed (0x0110, as a peer whose disk failed after C-STORE success would), or
    None for no report ever. The report goes half a second after the N-ACTION's answer (as peers
    send them) on an association of its own to ``report_to`` (port at 127.0.0.1, AE title), or with
    ``on_request_association`` on the request's own (``report_statuses`` then records None where
    it was gone, as fo-dicom's synchronous reports meet it). Records the instances ``stored``, each
    request's UIDs (``requests``) and the status each report got (``report_statuses``)."""
    from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    seen: dict[str, list] = {"stored": [], "requests": [], "report_statuses": []}

    def report(information: Dataset, lost: list[str], own: Any = None) -> None:
        result = Dataset()
        result.TransactionUID = information.TransactionUID
        committed, failed = [], []
        for asked in information.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = asked.ReferencedSOPClassUID, asked.ReferencedSOPInstanceUID
            if str(asked.ReferencedSOPInstanceUID) in lost:
                item.FailureReason = 0x0110
                failed.append(item)
            else:
                committed.append(item)
        result.ReferencedSOPSequence = committed
        if failed:
            result.FailedSOPSequence = failed
        event_type = 2 if failed else 1
        if own is not None:
            if not own.is_established:
                seen["report_statuses"].append(None)
                return
            try:
                status, _ = own.send_n_event_report(result, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
            except Exception:  # released meanwhile
                status = None
            seen["report_statuses"].append(int(status.Status) if status else None)
            return
        assert report_to is not None
        sender = AE(ae_title)
        sender.add_requested_context(StorageCommitmentPushModel)
        assoc = sender.associate("127.0.0.1", report_to[0], ae_title=report_to[1], ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(result, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        assoc.release()
        seen["report_statuses"].append(int(status.Status))

    def on_store(event: Any) -> int:
        seen["stored"].append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(event: Any) -> tuple[int, None]:
        information = event.action_information
        seen["requests"].append([str(i.ReferencedSOPInstanceUID) for i in information.ReferencedSOPSequence])
        lost = lose(seen["requests"])
        if lost is not None and (report_to is not None or on_request_association):
            own = event.assoc if on_request_association else None
            threading.Timer(0.5, report, args=(information, lost, own)).start()
        return 0x0000, None

    peer = AE(ae_title)
    for context in storage or AllStoragePresentationContexts:
        peer.add_supported_context(getattr(context, "abstract_syntax", context))
    peer.add_supported_context(StorageCommitmentPushModel)
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)])
    try:
        yield seen
    finally:
        server.shutdown()
