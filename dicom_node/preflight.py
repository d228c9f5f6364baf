"""``mr2ct config check``: what the node needs from its deployment, checked before it serves.

`mr2ct serve` takes scanner traffic even when Orthanc is down or refuses its login (the spool is
the truth; jobs retry), so a wrong password or URL shows only as jobs retrying for an hour. These
checks say at once, naming the setting to change. Each check opens what the node would open
(the database without migrating it, Orthanc's REST API and its modality for the node, the model
file, the spool, the ports, the TLS files (DICOM's and the admin API's), the routing destination by C-ECHO) and nothing else: nothing is written to Orthanc,
and the database is read, not migrated (an SQLite file not there yet is made empty, as the node
would make it).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.settings import Settings
from synthesis.contrast import CHOICES, UNKNOWN, learned_parts

if TYPE_CHECKING:
    from dicom_node.orthanc_store import OrthancStore

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    name: str  # what was checked
    message: str  # what was found; a failure names the setting to change


def _database(s: Settings) -> Check:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import make_url

    from dicom_node.db import DatabaseUnavailable, alembic_config, make_engine, read_only

    shown = make_url(s.database_url).render_as_string(hide_password=True) if "://" in s.database_url else s.database_url
    try:
        engine = make_engine(s.database_url)
        try:
            with engine.connect() as connection:
                current = MigrationContext.configure(connection).get_current_revision()
                takes_no_writes = read_only(connection)
        finally:
            engine.dispose()
    except DatabaseUnavailable as exc:
        return Check(FAIL, "database", f"database_url: {exc}")
    except Exception as exc:
        return Check(FAIL, "database", f"database_url: cannot open {shown}: {getattr(exc, 'orig', exc)}")
    if takes_no_writes:  # a standby, or a primary a failover demoted: it answers, and takes no write
        return Check(FAIL, "database", f"database_url: {shown} is read-only (a standby?): the node records nothing there; "
                                       "point it at the primary")
    head = ScriptDirectory.from_config(alembic_config(s.database_url)).get_current_head()
    if current == head:
        return Check(OK, "database", f"{shown}, schema at revision {head}")
    found = f"at revision {current}" if current else "empty"
    return Check(OK, "database", f"{shown}, schema {found}: the node brings it to revision {head} when it starts")


def orthanc_checks(s: Settings) -> list[Check]:
    """Orthanc and its login; then, when it answered, how its routing plugin reaches the node."""
    from orthanc_api_client.exceptions import HttpError

    from dicom_node.orthanc_store import OrthancStore

    password = s.orthanc_password.get_secret_value() if s.orthanc_password else None
    store = OrthancStore(s.orthanc_url, s.orthanc_username, password, s.orthanc_timeout_seconds)
    try:
        system = store.client.get_system()
    except HttpError as exc:
        if exc.http_status_code in (401, 403):
            return [Check(FAIL, "orthanc", f"Orthanc at {s.orthanc_url} refused the login (HTTP {exc.http_status_code}): "
                                           "check orthanc_username and orthanc_password")]
        return [Check(FAIL, "orthanc", f"Orthanc at {s.orthanc_url} answered HTTP {exc.http_status_code}: check orthanc_url")]
    except Exception as exc:
        return [Check(FAIL, "orthanc", f"Orthanc at {s.orthanc_url} is not reachable (or did not answer within "
                                       f"{s.orthanc_timeout_seconds:g} s): check orthanc_url ({type(exc).__name__})")]
    node_modality = _orthanc_modality(store, NODE_MODALITY)  # asked once: both checks below read it
    originals = [_originals_from_orthanc(s, node_modality)] if s.originals_from == "orthanc" else []
    return [Check(OK, "orthanc", f"Orthanc {system.get('Version', '?')} at {s.orthanc_url}, login accepted"),
            _from_orthanc(s, node_modality, str(system.get("DicomAet", ""))), *(_deliver_to(store, name, s.deliver_commitment) for name in s.deliver_to),
            *originals]


def _originals_from_orthanc(s: Settings, modality: dict[str, Any] | str | None) -> Check:
    """originals_from = orthanc: whether Orthanc will hold the MR series a worker reads there (it
    routes series to the node, or this host's node routes originals to it); else jobs wait for
    originals that never come and fail after their retries (about an hour)."""
    if s.forward_originals and not s.forward_to:
        return Check(OK, "originals", "originals_from orthanc: what spool_dir lacks is read from Orthanc, where this node routes "
                                      "the originals (forward_originals)")
    if isinstance(modality, dict):
        return Check(OK, "originals", f"originals_from orthanc: what spool_dir lacks is read from Orthanc, which routes MR series "
                                      f"to the node (its modality '{NODE_MODALITY}')")
    return Check(WARN, "originals", f"originals_from orthanc: Orthanc declares no modality '{NODE_MODALITY}' (it does not route "
                                    "series to the node), so it holds a series only where the SCP's host routes originals to it "
                                    "(forward_originals without forward_to there); otherwise jobs wait for originals that never "
                                    "come, and fail after their retries")


def _orthanc_modality(store: OrthancStore, name: str) -> dict[str, Any] | str | None:
    """Orthanc's configuration of its DICOM modality ``name``; None when it declares none; why not, when it did not answer."""
    from orthanc_api_client.exceptions import HttpError

    try:
        return dict(store.client.get(f"modalities/{name}/configuration").json())
    except HttpError as exc:
        return None if exc.http_status_code == 404 else f"HTTP {exc.http_status_code}"
    except Exception as exc:
        return type(exc).__name__


def _deliver_to(store: OrthancStore, name: str, commitment: bool = False) -> Check:
    """A modality of ``deliver_to``: declared in Orthanc (else nothing is ever delivered: a failure),
    with ``commitment`` allowed to send Orthanc its reports (else nothing is ever committed: a
    failure), and answering Orthanc's C-ECHO (else a warning: a planning system may be off now)."""
    modality = _orthanc_modality(store, name)
    if modality is None:
        return Check(FAIL, "deliver to", f"deliver_to {name}: Orthanc declares no DICOM modality {name!r} (its DicomModalities): "
                                         "no sCT would ever be delivered there")
    if isinstance(modality, str):
        return Check(WARN, "deliver to", f"deliver_to {name}: Orthanc did not list it ({modality})")
    where = f"{modality.get('AET', '?')}@{modality.get('Host', '?')}:{modality.get('Port', '?')}"
    if commitment and modality.get("AllowEventReport") is False:
        return Check(FAIL, "deliver to", f"deliver_to {name} ({where}): deliver_commitment is on, but Orthanc refuses that modality's "
                                         "N-EVENT-REPORT (AllowEventReport false in its DicomModalities): no delivery would ever be committed")
    try:
        store.client.post(f"modalities/{name}/echo", json={"Timeout": 10}, timeout=30)
    except Exception:
        return Check(WARN, "deliver to", f"deliver_to {name} ({where}) does not answer Orthanc's C-ECHO: deliveries wait until it does")
    return Check(OK, "deliver to", f"deliver_to {name} ({where}) answers Orthanc's C-ECHO")


NODE_MODALITY = "mr2ct"  # the name Orthanc's routing plugin sends to (orthanc/plugin.py: MR2CT_NODE_MODALITY's default)


def _from_orthanc(s: Settings, modality: dict[str, Any] | str | None, orthanc_aet: str) -> Check:
    """Whether what Orthanc routes (its plugin's C-STORE to the modality ``mr2ct``) would be taken:
    the modality's port and (when the node checks it) called AE title are the node's, and the node's
    allow-list has Orthanc's AE title. Either wrong, every routed series was refused or never
    arrived, seen only in Orthanc's log. ``modality``: ``_orthanc_modality``'s answer for it."""
    if modality is None:
        return Check(WARN, "from orthanc", f"Orthanc declares no DICOM modality '{NODE_MODALITY}': its routing plugin sends "
                                           "this node nothing (fine when scanners send to the node directly; "
                                           "`mr2ct orthanc-config` writes one)")
    if isinstance(modality, str):
        return Check(WARN, "from orthanc", f"Orthanc did not list its modality '{NODE_MODALITY}' ({modality})")
    called, host, port = str(modality.get("AET", "")), str(modality.get("Host", "")), int(modality.get("Port", 0))
    problems = []
    if port != s.dicom_port:
        problems.append(f"it sends to port {port}, the node listens on dicom_port {s.dicom_port}")
    if s.check_called_ae and called != s.ae_title:
        problems.append(f"it calls AE title {called!r}, the node (check_called_ae) answers only to ae_title {s.ae_title!r}")
    if s.allowed_aes and orthanc_aet not in {entry.split("@", 1)[0] for entry in s.allowed_aes}:
        problems.append(f"allowed_aes does not list Orthanc's AE title {orthanc_aet!r}: the node would refuse every series it routes")
    where = f"Orthanc's modality '{NODE_MODALITY}' ({called}@{host}:{port})"
    if problems:
        return Check(FAIL, "from orthanc", f"{where}: " + "; ".join(problems))
    return Check(OK, "from orthanc", f"{where} reaches the node, which takes Orthanc's AE title {orthanc_aet!r}")


def selection_against_card(card: dict[str, Any], s: Settings) -> tuple[str, list[str]]:
    """What a model's card says it learned, in words, and how the node's selection rules let
    through series it never learned (`config check`'s model line, `mr2ct models activate`). A card
    made before a key existed says nothing of it, and nothing is held to it. With
    ``select_follow_model`` the node takes its selection from the card (``registry.FollowedSelection``):
    nothing to warn of."""
    trained = card.get("mr_contrasts")
    follows = "; the node's selection follows its card (select_follow_model)" if s.select_follow_model else ""
    if not trained:
        return "its card does not say which MR contrasts it was trained on (made before 2026-12-05)" + follows, []
    selected = s.select_acquisition_contrasts
    beyond = [c for c in selected if c not in trained] if selected else ["any"]
    warnings = [f"select_acquisition_contrasts {selected or '(empty: any)'} lets through {beyond}, whose sCT the model never "
                "learned to make"] if beyond else []
    learned = f"trained on MR contrasts {trained}"
    for key, setting, chosen, what in (("mr_contrast_agents", "select_contrast_agent", s.select_contrast_agent, "a contrast agent"),
                                       ("mr_fat_suppression", "select_fat_suppression", s.select_fat_suppression, "fat suppression")):
        # WITH and/or WITHOUT; cards made before 2026-12-06 do not say, and UNKNOWN is a pulled cache's series that did not record it
        seen = [a for a in card.get(key) or () if a in ("WITH", "WITHOUT")]
        if not seen:
            continue
        learned += ", " + " and ".join(a.lower() for a in seen) + f" {what}"
        admitted = [a.lower() for a in CHOICES[chosen] if a not in seen]
        if admitted:
            warnings.append(f"{setting} {chosen!r} lets through series {' and '.join(admitted)} {what}, which the model never learned")
    parts = [p for p in card.get("mr_body_parts") or () if p != UNKNOWN]  # cards made before 2026-12-06 do not say
    if parts:
        learned += f", body parts {parts}"
        known = learned_parts(parts)
        other = [p for p in s.select_body_parts if p not in known and p != UNKNOWN] if s.select_body_parts else ["any"]
        if other:
            warnings.append(f"select_body_parts {s.select_body_parts or '(empty: any)'} lets through {other}, whose anatomy the model "
                            "never learned")
    return learned + follows, [] if follows else warnings


def _active_in_registry(s: Settings) -> Any:
    """The registry's active model (``dicom_node.registry``), which the workers use instead of
    model_file; None when none is, or the database cannot say (its own check reports that)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from dicom_node.db import make_engine
    from dicom_node.models import ModelVersion

    try:
        engine = make_engine(s.database_url)
        try:
            with Session(engine) as session:
                return session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True))).first()
        finally:
            engine.dispose()
    except Exception:  # no database yet, or one before the registry: model_file is what runs
        return None


def _model(s: Settings) -> Check:
    """The model the workers run: the registry's active one, else model_file; loaded, and its card
    held against the selection rules."""
    from dicom_node.registry import registered_weights
    from synthesis.errors import ModelMismatch
    from synthesis.model_file import load_model

    active = _active_in_registry(s)
    try:
        if active is not None:
            model = load_model(registered_weights(active))
        else:
            model = load_model(s.model_file)
    except (ModelMismatch, OSError, ValueError) as exc:
        if active is not None:
            return Check(FAIL, "model", f"the registry's active model {active.id} {active.name!r}: {exc} (mr2ct models activate another)")
        return Check(FAIL, "model", f"model_file: {exc}")
    name = (f"the registry's active model {active.id} {active.name!r} (model_file is used while none is active)" if active is not None
            else s.model_file.name)
    said = f"{name}: {model.card['architecture']} generator, SHA-256 {model.short_digest}"
    learned, warnings = selection_against_card(model.card, s)
    if not model.card.get("mr_contrasts"):
        return Check(OK, "model", f"{said}; {learned}")
    if warnings:
        return Check(WARN, "model", f"{said}, {learned}: " + "; ".join(warnings))
    return Check(OK, "model", f"{said}, {learned}")


def _spool(s: Settings) -> Check:
    spool = Path(s.spool_dir)
    try:
        spool.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=spool, prefix=".check-"):
            pass
    except OSError as exc:
        return Check(FAIL, "spool", f"spool_dir: {spool} cannot be written ({exc.strerror})")
    stat = os.statvfs(spool)
    free_mb = stat.f_bavail * stat.f_frsize // 2**20
    if free_mb < s.spool_min_free_mb:
        return Check(FAIL, "spool", f"{spool} has {free_mb} MB free, below spool_min_free_mb ({s.spool_min_free_mb}): "
                                    "every instance would be refused (0xA700)")
    return Check(OK, "spool", f"{spool}, writable, {free_mb} MB free (refusing below {s.spool_min_free_mb} MB)")


def _port(name: str, key: str, host: str, port: int) -> Check:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return Check(WARN, name, f"{host}:{port} is in use ({exc.strerror}): a node already running, or another program "
                                 f"({key} names the port)")
    return Check(OK, name, f"{host}:{port} free")


def _tls(s: Settings) -> Check | None:
    from dicom_node.service import client_tls_context, tls_context

    if s.tls_certificate is None and not s.forward_tls:
        return None
    try:
        tls_context(s)
        if s.forward_tls:
            client_tls_context(s)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return Check(FAIL, "tls", f"tls_certificate / tls_private_key / tls_ca_file: {exc}")
    return Check(OK, "tls", "certificate, key" + (" and CA file" if s.tls_ca_file else "") + " load")


def _api_tls(s: Settings) -> Check | None:
    """The admin API's HTTPS: its certificate and key load; without them, a warning when the API
    listens beyond loopback (bearer tokens in clear)."""
    import ssl

    from dicom_node.service import is_loopback

    if not s.api_port:
        return None
    if s.api_tls_certificate is None:
        if is_loopback(s.api_host):
            return None
        return Check(WARN, "api tls", f"the admin API listens on {s.api_host} over plain HTTP: its bearer tokens cross the network in "
                                      "clear (set api_tls_certificate and api_tls_private_key, or put a TLS proxy in front)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(s.api_tls_certificate), str(s.api_tls_private_key))
    except (OSError, ValueError) as exc:
        return Check(FAIL, "api tls", f"api_tls_certificate / api_tls_private_key: {exc}")
    return Check(OK, "api tls", "certificate and key load: the admin API answers HTTPS")


def _routing(s: Settings) -> Check | None:
    if not s.forward_originals:
        return None
    if not s.forward_to:
        return Check(OK, "routing", f"originals routed to Orthanc at {s.orthanc_url} (see the orthanc check)")
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_node.commitment import STORAGE_COMMITMENT
    from dicom_node.service import client_tls_context
    from dicom_node.settings import parse_dicom_destination
    from dicom_node.transport import NodeAE

    called, host, port = parse_dicom_destination(s.forward_to)
    ae = NodeAE(s.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    if s.forward_commitment:
        ae.add_requested_context(STORAGE_COMMITMENT)
    tls = (client_tls_context(s), host) if s.forward_tls else None
    assoc = ae.associate(host, port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return Check(FAIL, "routing", f"forward_to {s.forward_to}: no association (rejected, aborted or not listening)")
    try:
        status = assoc.send_c_echo()
        commits = any(str(c.abstract_syntax) == STORAGE_COMMITMENT for c in assoc.accepted_contexts)
    finally:
        assoc.release()
    if not status or status.Status != 0:
        return Check(FAIL, "routing", f"forward_to {s.forward_to}: C-ECHO answered {getattr(status, 'Status', 'nothing')}")
    if s.forward_commitment and not commits:
        return Check(FAIL, "routing", f"forward_commitment: forward_to {s.forward_to} does not accept Storage Commitment Push Model "
                                      "from this node: nothing routed would ever be committed, and spool retention would keep it all")
    return Check(OK, "routing", f"forward_to {s.forward_to} answered C-ECHO" + (", takes storage commitment requests" if s.forward_commitment else ""))


def _commitment_peers(s: Settings) -> list[Check]:
    """Each storage commitment requester's address takes the association the node's reports go on;
    one that does not is a warning (a scanner may be off now), naming the entry."""
    from dicom_node.commitment import peers, report_association

    checks = []
    for peer, (host, port) in peers(s.commitment_peers).items():
        try:
            report_association(s.ae_title, peer, host, port, timeout=10).release()
        except (ConnectionError, OSError) as exc:
            checks.append(Check(WARN, "commitment", f"commitment_peers {peer}@{host}:{port}: {exc}; its storage commitment reports "
                                                    "wait until it does"))
        else:
            checks.append(Check(OK, "commitment", f"{peer}@{host}:{port} takes the association storage commitment reports go on"))
    return checks


def _audit_syslog(s: Settings) -> Check | None:
    """The audit record repository: a TLS, TCP or RELP one is connected to (TLS: its certificate
    checked, the node's own presented; RELP: a session opened, the syslog command offered); UDP
    cannot be asked, so it is only named."""
    if not s.audit_syslog:
        return None
    from dicom_node import atna

    if s.audit_syslog.startswith("udp://"):
        return Check(WARN, "audit syslog", f"{s.audit_syslog}: UDP, best effort (a datagram lost on the way is lost; nothing answers "
                                           "to check); tls:// sends each message at least once, relp+tls:// has each acknowledged")
    try:
        context = atna.context_for(s)
        transport = atna.Transport(s.audit_syslog, context, timeout=10)
        transport.send([])  # connect (and handshake; over RELP, open a session), send nothing
        transport.close()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return Check(FAIL, "audit syslog", f"audit_syslog {s.audit_syslog}: {exc}")
    return Check(OK, "audit syslog", f"{s.audit_syslog} accepts a {'RELP session (syslog offered)' if transport.relp else 'connection'}"
                 + (" (TLS: the repository's certificate checked)" if context is not None else ""))


def log_orthanc_checks(settings: Settings) -> None:
    """What `mr2ct serve` says at start-up of Orthanc (from a thread: the node does not wait for it):
    a failure as a warning naming the setting, since the node takes traffic whatever Orthanc
    answers and its jobs would only retry; a warning (no modality for the node) as information."""
    for check in orthanc_checks(settings):
        if check.status == FAIL:
            log.warning("start-up check %s: %s (the node takes traffic; its jobs retry until this is mended)", check.name, check.message)
        elif check.status == WARN:
            log.info("start-up check %s: %s", check.name, check.message)


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order the node needs them; a check that does not apply is left out."""
    s = settings
    checks = [_database(s), *orthanc_checks(s), _model(s), _spool(s), _port("dicom port", "dicom_port", s.dicom_host, s.dicom_port)]
    if s.api_port:
        checks.append(_port("api port", "api_port", s.api_host, s.api_port))
    checks += [c for c in (_tls(s), _api_tls(s), _routing(s), _audit_syslog(s)) if c is not None]
    checks += _commitment_peers(s)
    return checks
