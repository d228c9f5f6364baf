"""``mr2ct serve``: the SCP, the stability monitor and the worker in one process.

Roles (``--role``): ``all`` (default) runs everything; ``scp`` only receives and
groups; ``worker`` only runs jobs. Several workers over PostgreSQL are the
scale-out issue's; the seams are here.
"""

from __future__ import annotations

import logging
import ipaddress
import signal
from pathlib import Path
from collections.abc import Callable
from typing import Any
import ssl
import threading
import time
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from dicom_node import audit
from dicom_node.db import init_db, listen_for_jobs, stop_waking, wake_on_job_queued
from dicom_node.deferred import Journal
from dicom_node.forwarder import CStoreDestination, Destination, OrthancRestDestination, forward_loop
from dicom_node.ingest import Ingest, SelectionRules
from dicom_node.recorder import Recorder
from dicom_node.registry import node_selection
from dicom_node.recovery import recover_spool, requeue_orphaned_jobs
from dicom_node.retention import retention_loop, routing_rule
from dicom_node.orthanc_store import OrthancStore
from dicom_node.scp import StoreSCP
from dicom_node.settings import Settings, parse_dicom_destination
from dicom_node.spool import Spool
from dicom_node.systemd import STARTED, notify
from dicom_node.worker import Worker, complete_series, stability_loop

log = logging.getLogger(__name__)

ROLES = ("all", "scp", "worker", "api")
API_START_SECONDS = 30.0  # how long the admin API may take to bind before start-up fails naming api_port


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server-side TLS context when a certificate is configured; client certificates required with a CA file."""
    if settings.tls_certificate is None or settings.tls_private_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    if settings.tls_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(settings.tls_ca_file))
    return context


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to listen on) is this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def client_tls_context(settings: Settings) -> ssl.SSLContext:
    """TLS towards a routing destination: its certificate must chain to tls_ca_file and name its
    host; this node's own certificate is presented when it has one."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_certificate is not None and settings.tls_private_key is not None:
        context.load_cert_chain(str(settings.tls_certificate), str(settings.tls_private_key))
    return context


def routing_destination(settings: Settings, password: str | None) -> Destination | None:
    """Where forward_originals routes (None: it does not): an AE by C-STORE, else Orthanc by REST.
    Building one opens no connection."""
    s = settings
    if not s.forward_originals:
        return None
    if s.forward_to:
        return CStoreDestination(s.forward_to, s.ae_title, ssl_context=client_tls_context(s) if s.forward_tls else None,
                                 poll_seconds=s.dicom_poll_ms / 1000)
    return OrthancRestDestination(OrthancStore(s.orthanc_url, s.orthanc_username, password, s.orthanc_timeout_seconds))


@dataclass
class Node:
    settings: Settings
    role: str = "all"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.scp: StoreSCP | None = None
        self.audit_exporter: Any = None  # dicom_node.atna.Exporter when audit_syslog is set
        self.recorder: Recorder | None = None
        self.work_queued = threading.Event()  # set when a job is queued (here or, on PostgreSQL, anywhere): wakes the worker

    def start(self) -> None:
        s = self.settings
        self.sessions = init_db(s.database_url)
        if s.audit_syslog:  # first: what this start does (a store the SCP takes at once among it) is sent
            self._start_audit_export()
        password = s.orthanc_password.get_secret_value() if s.orthanc_password else None
        # the rules at each series' completion: the settings', or those the running model's card speaks of taken from it
        self.rules: Callable[[], SelectionRules] = node_selection(s, self.sessions)
        # Built once (its TLS context reads files): the SCP routes to it, the API reports it.
        destination = routing_destination(s, password) if self.role in ("all", "scp", "api") else None
        if self.role in ("all", "worker"):  # torch only here: an SCP or API process starts without it (~1.5 s sooner, ~200 MB less)
            import torch

            from synthesis.infer import choose_device
            from synthesis.model_file import load_model

            if s.cpu_threads:
                torch.set_num_threads(s.cpu_threads)
            model = load_model(s.model_file)
            device = choose_device(s.device)
            self.device_label, self.model_sha256 = device.label, model.sha256
            log.info("device=%s reason=%s precision=%s torch_compile=%s", device.label, device.reason, s.precision, s.torch_compile)
            log.info("model=%s sha256=%s architecture=%s test_time_augmentation=%s", s.model_file.name, model.short_digest,
                     model.card["architecture"], model.test_time_augmentation if s.test_time_augmentation == "model" else s.test_time_augmentation)
            store = OrthancStore(s.orthanc_url, s.orthanc_username, password, s.orthanc_timeout_seconds)
            deliverer = None
            if s.deliver_to:  # each done job's sCT and SR sent on by Orthanc to these modalities
                from dicom_node.delivery import Deliverer

                deliverer = Deliverer(self.sessions, store, commitment=s.deliver_commitment,
                                      commitment_wait_seconds=s.deliver_commitment_wait_seconds)
                self._thread("delivery", deliverer.loop, self.stop_event, s.poll_seconds)
                log.info("results delivered by Orthanc to modalities %s%s", ", ".join(s.deliver_to),
                         ", each asked for storage commitment" if s.deliver_commitment else "")
            if s.orthanc_outcome_notes:  # why a series has no sCT (or which is its sCT), on the series in Orthanc
                from dicom_node.outcomes import OutcomeNotes

                self._thread("outcome-notes", OutcomeNotes(self.sessions, store).loop, self.stop_event, s.poll_seconds)
            worker = Worker(self.sessions, model, device, store, s.uid_root, s.batch_size, s.precision, s.torch_compile,
                            s.test_time_augmentation, synthesis_plane=s.synthesis_plane, ct_plane=s.ct_plane,
                            deliver_to=s.deliver_to, on_delivery=deliverer.wake.set if deliverer else None,
                            originals_from=s.originals_from, spool_dir=s.spool_dir)
            if s.originals_from == "orthanc":
                log.info("originals not in this spool_dir (%s) read from %s", s.spool_dir, s.orthanc_url)
            requeue_orphaned_jobs(self.sessions, worker.worker_id)
            wake_on_job_queued(self.work_queued)  # jobs queued by this process (series completion, API retry)
            self._thread("worker", worker.loop, self.stop_event, s.poll_seconds, self.work_queued)
            if make_url(s.database_url).get_backend_name() == "postgresql":  # jobs queued by other processes wake it too
                self._thread("job-listener", listen_for_jobs, s.database_url, self.work_queued, self.stop_event)
            log.info("worker ready id=%s", worker.worker_id)
        if self.role in ("all", "scp"):
            if not s.allowed_aes:
                log.warning("allowed_aes is empty: any calling AE title may store to %s", s.ae_title)
            spool = Spool(s.spool_dir, min_free_bytes=s.spool_min_free_mb * 2**20)
            recover_spool(spool, self.sessions)
            journal = Journal(spool.root, self.sessions)  # refusals, associations: kept while the database is away
            journal.adopt()
            journal.write_kept()  # what a process that is gone kept: written before anything new
            self.recorder = Recorder(self.sessions)
            ingest = Ingest(spool, self.sessions, self.recorder)
            on_released = None
            if s.complete_on_release:
                def on_released(series_uids: set[str]) -> None:
                    for uid in series_uids:
                        complete_series(self.sessions, uid, 0, self.rules(), "association released")
            reporter = None
            if s.commitment_peers:  # storage commitment: requests from these AEs, reports to their addresses
                from dicom_node.commitment import Reporter, peers

                reporter = Reporter(self.sessions, s.ae_title, peers(s.commitment_peers))
                self._thread("commitment", reporter.loop, self.stop_event, s.poll_seconds)
            self.scp = StoreSCP(s.ae_title, s.allowed_aes, ingest, self.sessions, s.max_associations, on_released,
                                forward_only=frozenset(s.forward_sop_classes), poll_seconds=s.dicom_poll_ms / 1000,
                                check_called_ae=s.check_called_ae, commitment_peers=frozenset(reporter.peers) if reporter else frozenset(),
                                on_commitment=reporter.wake.set if reporter else None,
                                reports_from=parse_dicom_destination(s.forward_to)[0] if s.forward_commitment and s.forward_to else None,
                                max_refusals=s.forward_max_refusals, journal=journal)
            self._thread("journal", journal.loop, self.stop_event, s.poll_seconds)
            try:
                self.scp.start(s.dicom_host, s.dicom_port, tls_context(s))
            except OSError as exc:  # the port taken, an address not here: say which setting (was a bare "Address already in use")
                raise ValueError(f"dicom_port: the SCP cannot listen on {s.dicom_host}:{s.dicom_port} ({exc.strerror or exc}); "
                                 "free the port or choose another") from exc
            self._thread("stability", stability_loop, self.sessions, s.stable_seconds, s.poll_seconds, self.stop_event, self.rules,
                         lambda: self.recorder.pending_series() | journal.pending_series())
            if s.spool_retention_hours or s.spool_failed_retention_hours:
                if s.spool_retention_hours:
                    log.info("spool retention: originals deleted %g hours after they arrived, once no longer needed", s.spool_retention_hours)
                if s.spool_failed_retention_hours:
                    log.info("spool retention: a failed series' originals deleted %g hours after it failed", s.spool_failed_retention_hours)
                self._thread("spool-retention", retention_loop, self.sessions, s.spool_dir, s.spool_retention_hours,
                             s.spool_failed_retention_hours, routing_rule(s.forward_originals, s.forward_commitment), self.stop_event)
            if destination is not None:
                log.info("routing originals to %s", destination.name)
                self._thread("forwarder", forward_loop, self.sessions, destination, s.poll_seconds, self.stop_event, s.forward_max_refusals)
                if s.forward_commitment and s.forward_to:
                    from dicom_node.forward_commitment import Committer

                    committer = Committer(self.sessions, s.forward_to, s.ae_title, s.uid_root, s.forward_commitment_wait_seconds,
                                          client_tls_context(s) if s.forward_tls else None, poll_seconds=s.dicom_poll_ms / 1000,
                                          max_refusals=s.forward_max_refusals, linger_seconds=s.forward_commitment_linger_seconds,
                                          stopping=self.stop_event)
                    self._thread("forward-commitment", committer.loop, self.stop_event, s.poll_seconds)
                    log.info("storage commitment asked of %s for what is routed there; retention waits for it", committer.name)
        if self.role in ("all", "api") and s.api_port:
            self._start_api(password, destination.name if destination is not None else None)
        if self.role in ("all", "scp", "worker"):  # what Orthanc answers, and whether what it routes would be taken
            from dicom_node.preflight import log_orthanc_checks

            # not one of the threads stop() waits for: a hung Orthanc must not hold a shutdown
            threading.Thread(target=log_orthanc_checks, args=(s,), name="orthanc-check", daemon=True).start()
        audit.record(self.sessions, audit.APPLICATION_START, "success", f"mr2ct {self.role}", ae_title=s.ae_title, port=s.dicom_port)
        log.info("%s%s", STARTED, self.role)  # start-up done: what a supervisor or a test waits for
        notify(f"READY=1\nSTATUS={STARTED}{self.role}")  # systemd, for a unit of Type=notify

    def _start_audit_export(self) -> None:
        """Send the audit trail to the repository (IHE ATNA), from the rows after those already
        sent (on the first start with it set: from this start on)."""
        from dicom_node import atna

        s = self.settings
        assert s.audit_syslog is not None
        try:
            context = atna.context_for(s)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"audit_syslog_ca_file / audit_syslog_certificate / audit_syslog_private_key: {exc}") from exc
        atna.start_position(self.sessions, s.audit_syslog)
        source = atna.Source(source_id=s.audit_source_id or s.ae_title, ae_title=s.ae_title, site_id=s.audit_enterprise_site_id)
        self.audit_exporter = atna.Exporter(self.sessions, atna.Transport(s.audit_syslog, context), source,
                                            holder=f"{source.host}:{source.process_id}:{self.role}")
        self._thread("audit-export", self.audit_exporter.loop, self.stop_event, s.poll_seconds)
        log.info("audit trail sent to %s (DICOM audit messages in syslog)", s.audit_syslog)

    def _start_api(self, password: str | None, routing: str | None) -> None:
        import uvicorn

        from dicom_node.api.app import create_app

        s = self.settings
        info = {"role": self.role}
        if getattr(self, "device_label", None):
            info["device"] = self.device_label
            info["model_sha256"] = self.model_sha256
        app = create_app(
            self.sessions, orthanc_url=s.orthanc_url, orthanc_auth=(s.orthanc_username or "", password or "") if s.orthanc_username else None,
            spool_dir=str(s.spool_dir) if Path(s.spool_dir).exists() else None, spool_min_free_mb=s.spool_min_free_mb, node_info=info,
            routing=routing, orthanc_timeout=s.orthanc_timeout_seconds, audit_export=s.audit_syslog,
            forward_commitment_on=s.forward_commitment, rules=self.rules, originals_from=s.originals_from, selection=s,
        )
        tls = {}
        if s.api_tls_certificate is not None:
            tls = {"ssl_certfile": str(s.api_tls_certificate), "ssl_keyfile": str(s.api_tls_private_key)}
        elif not is_loopback(s.api_host):
            log.warning("the admin API listens on %s without TLS: its bearer tokens cross the network in clear; set "
                        "api_tls_certificate and api_tls_private_key, or serve it behind a TLS proxy", s.api_host)
        # log_config None: uvicorn's lines go through the root logger, in the node's log_format (its own config writes text)
        config = uvicorn.Config(app, host=s.api_host, port=s.api_port, log_level="warning", access_log=False, log_config=None, **tls)
        try:
            config.load()  # a certificate or key that does not load stops start-up here, not later in the API's thread
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"api_tls_certificate / api_tls_private_key: {exc}") from exc
        self.api_server = uvicorn.Server(config)
        self.api_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        thread = self._thread("api", self.api_server.run)
        # "listening" once it is: uvicorn binds in its thread, and one that cannot (the port taken, an
        # address not here) logs why and ends the thread, which would leave a node without its API
        deadline = time.monotonic() + API_START_SECONDS
        while not self.api_server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.api_server.started:
            self.api_server.should_exit = True
            why = f"not listening after {API_START_SECONDS:g} s" if thread.is_alive() else "uvicorn's error is logged above"
            raise ValueError(f"api_port: the admin API cannot listen on {s.api_host}:{s.api_port} ({why}); "
                             "free the port or choose another")
        log.info("API listening address=%s:%d scheme=%s", s.api_host, s.api_port, "https" if tls else "http")

    def _thread(self, name: str, target: object, *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)
        return thread

    def stop(self, failed_to_start: Exception | None = None) -> None:
        """Stop what runs: the SCP and API first, then every thread (a running job is queued again
        between its batches). ``failed_to_start``: start() raised part way; what it had started is
        stopped the same way, and the audit row is a failed Application Start instead of a Stop."""
        notify("STOPPING=1")
        self.stop_event.set()
        stop_waking(self.work_queued)
        self.work_queued.set()
        if getattr(self, "api_server", None) is not None:
            self.api_server.should_exit = True
        if self.scp is not None:
            self.scp.stop()
        if self.recorder is not None:
            self.recorder.stop()
        for thread in self.threads:
            thread.join(timeout=120)
        if failed_to_start is None:
            audit.record(self.sessions, audit.APPLICATION_STOP, "success", f"mr2ct {self.role}")
        else:
            audit.record(self.sessions, audit.APPLICATION_START, "failure", f"mr2ct {self.role}", reason=str(failed_to_start)[:500])
        exporter = self.audit_exporter
        if exporter is not None:  # the stop itself, and what came since the loop's last round
            try:
                exporter.send_pending()
            except Exception as exc:
                log.warning("audit export to %s: not sent before stopping (sent at the next start): %s", exporter.destination, exc)
            exporter.release()
        log.info("stopped")

    def run_until_signalled(self) -> None:
        done = threading.Event()

        def _handler(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        try:
            self.start()
        except Exception as exc:
            if getattr(self, "sessions", None) is not None:  # the database opened: stop what started, and say why
                try:
                    self.stop(failed_to_start=exc)
                except Exception:  # the reason start-up failed is what the administrator must see
                    log.exception("stopping what had started")
            raise
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
