"""Settings: one pydantic-settings class, read from a TOML file and ``MR2CT_*`` variables.

Precedence (highest first): explicit arguments, environment variables, the
config file (``--config`` or ``MR2CT_CONFIG``), defaults. A bad value stops
start-up with a message that names the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from synthesis import default_model_path
from synthesis.contrast import CONTRASTS, DEFAULT_CHOICE, DEFAULT_BODY_PARTS, DEFAULT_SELECTED
from synthesis.image_type import COMPONENTS, NOT_ANATOMY, NOT_ANATOMY_COMPONENTS

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


DESTINATION_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})$")


SYSLOG_TLS_SCHEMES = ("tls://", "relp+tls://")  # the audit_syslog transports in TLS (dicom_node.atna)
MODALITY_NAME_RE = re.compile(r"^(?!\.+$)[A-Za-z0-9_.-]{1,64}$")  # a key of Orthanc's DicomModalities, safe in a REST path (not . or ..)


def parse_dicom_destination(value: str) -> tuple[str, str, int]:
    """``AE@host:port`` -> (AE title, host, port); ValueError saying what is wrong."""
    match = DESTINATION_RE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not AE@host:port (e.g. PACS@10.0.0.5:104)")
    ae, host, port = match["ae"], match["host"].strip("[]"), int(match["port"])
    _check_ae_title(ae, "the AE title")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is not between 1 and 65535")
    return ae.strip(), host, port


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key."""


def _check_ae_title(value: str, key: str) -> str:
    stripped = value.strip()
    if not AE_TITLE_RE.match(stripped):
        raise ValueError(f"{key} {value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return stripped


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MR2CT_", extra="forbid", validate_default=True)

    ae_title: str = Field("MR2CT", description="AE title of the C-STORE SCP")
    dicom_host: str = Field("127.0.0.1", description="address the SCP listens on")
    dicom_port: int = Field(11112, ge=1, le=65535, description="port the SCP listens on")
    allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="calling AE titles allowed to associate (comma-separated in env); empty: any"
    )
    spool_dir: Path = Field(Path("var/spool"), description="durable spool of received instances")
    database_url: str = Field("sqlite:///var/mr2ct.db", description="SQLAlchemy URL of the node's database")
    orthanc_url: str = Field("http://127.0.0.1:8042", description="Orthanc REST URL results are stored into")
    orthanc_username: str | None = Field(None, description="Orthanc HTTP user")
    orthanc_password: SecretStr | None = Field(None, description="Orthanc HTTP password")
    orthanc_timeout_seconds: float = Field(
        60.0, gt=0, le=3600, description="how long one request to Orthanc may wait to connect or for its next bytes (the client tries "
        "a request 4 times) before the attempt fails and is retried later: a hung Orthanc, or a connection a firewall dropped "
        "without a word, no longer holds a job, a routing pass or an API request for ever")
    orthanc_outcome_notes: bool = Field(
        True, description="write where each MR series stands (not synthesized and why, queued, synthesizing, its sCT stored, "
        "failed and why) on the series in Orthanc, as its Mr2ctOutcome metadata, which Orthanc Explorer shows on the series page "
        "(Orthanc must declare it in UserMetadata, as mr2ct orthanc-config writes it)")
    model_file: Path = Field(default_factory=default_model_path, description="generator weights (.safetensors) with their .json card")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="inference device")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU (default: torch's choice)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="inference precision; auto: bf16 on GPUs and CPUs with native bf16, fp16 on older GPUs, else fp32"
    )
    batch_size: int = Field(0, ge=0, le=1024, description="slices per inference batch (0: sized to the GPU's free memory; 8 on CPU)")
    torch_compile: bool = Field(False, description="run the generator through torch.compile (faster jobs; each new grid size compiles once, tens of seconds on a CPU)")
    test_time_augmentation: Literal["model", "none", "mirror", "dihedral", "dihedral-shift"] = Field(
        "model", description="views of each slice the generator runs on, outputs averaged: model (what its card says), none (1 forward), mirror (4), dihedral (8), dihedral-shift (32)"
    )
    synthesis_plane: Literal["auto", "axial", "acquired"] = Field(
        "auto", description="the slices the generator sees: auto (a 3D sagittal or coronal series as axial slices, the plane "
        "the model learnt; a 2D one with thick slices as acquired), axial (every series with evenly spaced slices), acquired"
    )
    ct_plane: Literal["acquired", "axial"] = Field(
        "acquired", description="the slices the sCT is written in: acquired (one CT slice per MR slice, overlaying it), axial "
        "(transverse slices, as planning systems take a CT: the axial slices the generator saw when synthesis_plane resliced the "
        "series, a 3D sagittal or coronal MR; a tilted one, or a tilted axial series, resampled onto exact transverse slices; "
        "a 2D sagittal or coronal series with thick slices stays as acquired)",
    )
    originals_from: Literal["spool", "orthanc"] = Field(
        "spool", description="where a worker reads a job's originals: spool (the files the SCP wrote; workers on other hosts "
        "need spool_dir shared), or orthanc (those this host's spool holds from it, the others from the Orthanc results go to, "
        "matched by SOP Instance UID: it holds the MR series where Orthanc routed it to the node, or the node routes originals "
        "there with forward_originals; a worker on a GPU host then needs no shared filesystem; one Orthanc does not hold yet "
        "is waited for, as for an Orthanc that is down; those spool retention deleted are read from Orthanc too, so a retry "
        "of such a series is taken)",
    )
    stable_seconds: float = Field(10.0, gt=0, le=86400, description="a series is complete after this long without new instances")
    uid_root: str = Field("1.2.826.0.1.3680043.8.498.", description="root of the UIDs mr2ct writes (ends with a dot)")
    poll_seconds: float = Field(0.5, gt=0, le=60, description="how often the stability monitor and worker look for work")
    api_host: str = Field("127.0.0.1", description="address the admin API listens on")
    api_port: int = Field(8800, ge=0, le=65535, description="admin API port (0: no API in this process)")
    api_tls_certificate: Path | None = Field(None, description="PEM certificate: the admin API answers HTTPS only when set (its bearer "
                                             "tokens cross the network encrypted); needed in practice once api_host is not loopback")
    api_tls_private_key: Path | None = Field(None, description="PEM private key of api_tls_certificate")
    log_format: Literal["text", "json"] = Field(
        "text", description="how `mr2ct serve` writes its log lines: text (time, level, logger, message) or json (one object per "
        "line: time in UTC, level, logger, message, process, thread, traceback), for a log collector",
    )
    commitment_peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AE@host:port of each AE that may ask the node for storage commitment (Storage "
        "Commitment Push Model): the node answers each request by N-EVENT-REPORT on an association it opens to that address "
        "(a scanner or Orthanc); a request from an AE not listed is refused (no address to answer to)",
    )
    audit_syslog: str | None = Field(
        None, description="an audit record repository (IHE ATNA) the audit trail is sent to as DICOM audit messages (PS3.15 A.5) "
        "in syslog: tls://host:6514 (RFC 5425; checked against audit_syslog_ca_file or the system's CAs), udp://host:514 "
        "(RFC 5426, best effort), tcp://host:601 (plain, octet-counted: a local relay only), relp+tls://host:port or "
        "relp://host:port (rsyslog's RELP, which acknowledges every message: nothing is lost when the repository goes down "
        "mid-batch). Events recorded from the first start with it set are sent in order, retried while the repository is "
        "down; GET /audit/export says where it stands",
    )
    audit_syslog_ca_file: Path | None = Field(None, description="PEM CA bundle that signed the repository's certificate (tls://, "
                                              "relp+tls://)")
    audit_syslog_certificate: Path | None = Field(None, description="PEM certificate the node presents to the repository (tls://, "
                                                  "relp+tls://; "
                                                  "ATNA asks for mutual authentication)")
    audit_syslog_private_key: Path | None = Field(None, description="PEM private key of audit_syslog_certificate")
    audit_source_id: str | None = Field(None, max_length=64, description="AuditSourceID of the messages (default: ae_title)")
    audit_enterprise_site_id: str | None = Field(None, max_length=64, description="AuditEnterpriseSiteID of the messages (e.g. the "
                                                 "hospital's name or OID)")
    check_called_ae: bool = Field(
        False, description="reject an association addressed to another called AE title than ae_title (a sender set up for "
        "another node); off: any called AE title, as dcmtk's storescp and Orthanc by default",
    )
    max_associations: int = Field(16, ge=1, le=1000, description="concurrent associations the SCP accepts")
    dicom_poll_ms: float = Field(
        0.2, gt=0, le=10, description="how often pynetdicom's reader polls an association with nothing to do, on associations the "
        "node accepts and opens (pynetdicom's own: 1 ms); lower answers every C-STORE sooner (~30 % more instances/s received "
        "here at 0.2 ms) for about 6 % more of a core per idle open association",
    )
    complete_on_release: bool = Field(False, description="a series is complete as soon as the association that sent it is released")
    spool_min_free_mb: int = Field(200, ge=0, description="refuse instances (out of resources) when the spool disk has less free space")
    spool_retention_hours: float = Field(
        0, ge=0, le=24 * 3650, description="delete an original from the spool this long after it arrived, once its series' newest "
        "job is done (or the series was ignored) and, when routing, it reached the destination; the database keeps its row "
        "(0: keep every original)",
    )
    spool_failed_retention_hours: float = Field(
        0, ge=0, le=24 * 3650, description="also delete the originals of a series whose newest job failed or was cancelled, "
        "this long after the job ended and after they arrived (a retry then asks for the series to be sent again), and those of "
        "a series set aside for a refused instance, this long after they arrived; at least "
        "spool_retention_hours (0: keep them until the series is retried or sent again)",
    )
    forward_originals: bool = Field(False, description="also store every received original into Orthanc (the node routes)")
    forward_sop_classes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="other SOP Class UIDs accepted only to be routed to Orthanc (needs forward_originals)"
    )
    forward_to: str | None = Field(
        None, description="where forward_originals routes: AE@host:port for DICOM C-STORE to any AE (e.g. PACS@10.0.0.5:104); "
        "unset: Orthanc over REST",
    )
    forward_max_refusals: int = Field(
        20, ge=0, description="an instance the destination refuses (a failure status, or no context for it) this many times "
        "(20: about an hour of backoff) is given up: listed by GET /routing, asked again after POST /routing/retry "
        "(0: ask for ever). Time unreachable does not count",
    )
    forward_tls: bool = Field(
        False, description="route to forward_to over TLS: its certificate is checked against tls_ca_file, and this node presents "
        "tls_certificate when one is set",
    )
    forward_commitment: bool = Field(
        False, description="ask forward_to for storage commitment of every original routed there (Storage Commitment Push "
        "Model, IHE RAD-10: an N-ACTION per batch, the destination's N-EVENT-REPORT taken on any association, the node's SCP "
        "among them): spool retention deletes an original only once the destination committed it, and one it reports failed "
        "is routed again. Needs forward_to; with allowed_aes, forward_to's AE title listed there (it opens the reports' association)",
    )
    forward_commitment_wait_seconds: float = Field(
        3600, gt=0, le=7 * 86400, description="a storage commitment request the destination has not answered this long after "
        "it was sent expires: its originals are asked for again in a new request (a report that comes later still counts)",
    )
    forward_commitment_linger_seconds: float = Field(
        5, ge=0, le=600, description="after the destination answered a storage commitment request, its association is held "
        "open this long for an archive that sends the report on it (some do, some only so): over at once when the report came "
        "on it or on another association; 0 releases it at once (such an archive's reports are then lost)",
    )
    deliver_to: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="names of DICOM modalities declared in Orthanc (its DicomModalities: a treatment "
        "planning system, say) to which Orthanc sends each sCT series and its SR once its job is done (C-STORE by Orthanc, asked "
        "over its REST API), retried with a growing pause while the modality is down; GET /deliveries lists them",
    )
    deliver_commitment: bool = Field(
        False, description="ask each modality of deliver_to, through Orthanc, for storage commitment of the sCT and SR it was "
        "sent (Orthanc's Storage Commitment SCU: Orthanc sends the N-ACTION and takes the modality's N-EVENT-REPORT on its own "
        "DICOM port, so the modality must know Orthanc's AE title and address): a delivery counts as sent only once the "
        "modality committed every instance; one it reports failed is sent again. Needs deliver_to",
    )
    deliver_commitment_wait_seconds: float = Field(
        3600, gt=0, le=7 * 86400, description="a delivery whose modality has not reported storage commitment this long after "
        "it was sent is sent again (and asked again), as a failed attempt",
    )
    # Selection rules: a complete series that does not match is recorded with the reason, not synthesized.
    select_modalities: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["MR"], description="modalities to synthesize")
    select_description_include: str | None = Field(None, description="regex a SeriesDescription must match (search, case-insensitive)")
    select_description_exclude: str | None = Field(None, description="regex a SeriesDescription must not match")
    select_min_slices: int = Field(1, ge=1, description="fewest instances a series needs to be synthesized")
    select_orientations: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["axial", "sagittal", "coronal", "oblique"], description="slice orientations to synthesize"
    )
    select_image_type_exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(NOT_ANATOMY), description="ImageType values that keep a series from synthesis (any value of "
        "its first instance's ImageType, case-insensitive; empty: none): localizers, Siemens mosaics (a volume's slices tiled in "
        "one image, no slice), phase images (P: Siemens, Philips; PHASE MAP, VELOCITY MAP, PHASE SUBTRACT: their pixels are "
        "angles), real or imaginary images (R, I, REAL, IMAGINARY) and a Dixon's water, fat and opposed-phase images (WATER, FAT, "
        "OPP_PHASE, OUT_PHASE, OPPOSED_PHASE: its in-phase image is the T1 one). Add e.g. DERIVED, DIFFUSION or ADC for maps a T1 "
        "model should not see",
    )
    select_complex_component_exclude: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(NOT_ANATOMY_COMPONENTS), description="complex components that keep a series from synthesis, "
        "as its first instance says in Complex Image Component (0008,9208) (an enhanced MR's) or in GE's private image type "
        f"(0043,xx2F of GEMS_PARM_01), where ImageType says ORIGINAL\\PRIMARY\\OTHER for all; one or more of {', '.join(COMPONENTS)}; "
        "empty: none",
    )
    select_acquisition_contrasts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_SELECTED), description="MR contrasts to synthesize, as the first instance tells them (another "
        "instance that reads another contrast makes the series MIXED) "
        "(synthesis.contrast: Acquisition Contrast (0008,9209) where an enhanced MR says it, else TOF where Angio Flag (0018,0025) "
        "is Y, else what an enhanced MR's pulse sequence says (Time of Flight or Phase Contrast YES; a steady-state free "
        "precession: MIXED), else the textbook reading of TR, TE, TI and the scanning sequence); the shipped model was trained on T1-weighted heads, and a T2, FLAIR or proton-density "
        f"series makes an sCT that is wrong everywhere. One or more of {', '.join(CONTRASTS)} (UNKNOWN: the header does not "
        "tell); empty: any",
    )
    select_contrast_agent: Literal["without", "with", "any"] = Field(
        DEFAULT_CHOICE, description="MR series to synthesize by whether their instances' headers say a contrast agent was "
        "given (any of them saying so: WITH; synthesis.contrast.contrast_agent: an enhanced MR's Contrast/Bolus Usage, else Contrast/Bolus Agent naming one): "
        "without, with, or any. The shipped model learned unenhanced T1 heads: in a post-gadolinium T1 the vessels, dura and any "
        "enhancing lesion are bright, and its sCT reads them as another tissue. Set to a model card's mr_contrast_agents "
        "(any: a model trained on both)",
    )
    select_fat_suppression: Literal["without", "with", "any"] = Field(
        DEFAULT_CHOICE, description="MR series to synthesize by whether their instances' headers say fat was suppressed "
        "(any of them saying so: WITH; synthesis.contrast.fat_suppression: an enhanced MR's Spectrally Selected Suppression FAT, else FS in ScanOptions): "
        "without, with, or any. In a fat-saturated T1 the scalp's fat and the skull's marrow are dark where the T1 the shipped "
        "model learned has them bright. Set to a model card's mr_fat_suppression (any: a model trained on both)",
    )
    select_body_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_BODY_PARTS), description="BodyPartExamined (0018,0015) values to synthesize, as the "
        "first instance says (case-insensitive; UNKNOWN: it says none, as many head exams do); the shipped model knows heads only, "
        "and a pelvis or a spine makes an sCT read as a skull. Add e.g. HEADNECK for a model trained on it; empty: any",
    )
    select_follow_model: bool = Field(
        False, description="take select_acquisition_contrasts, select_contrast_agent, select_fat_suppression and select_body_parts "
        "from the card of the model the workers run (the registry's active one, else model_file) at each series' completion: "
        "what it was trained on, and nothing else, so that activating a model trained on other series (`mr2ct models "
        "activate`) changes what the node synthesizes without a restart or an edit. A key the card does not speak of stays "
        "the setting's, and so does UNKNOWN (series whose header does not tell: synthesized where the setting lists it). Series "
        "set aside before an activation stay so until judged again (POST /series/rejudge, `mr2ct series rejudge`)",
    )
    tls_certificate: Path | None = Field(None, description="PEM certificate: the SCP speaks DICOM over TLS when set")
    tls_private_key: Path | None = Field(None, description="PEM private key of tls_certificate")
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle: when set, callers must present a certificate it signed")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value, "ae_title")

    @field_validator("allowed_aes", "select_modalities", "select_orientations", "select_image_type_exclude",
                     "select_complex_component_exclude", "select_acquisition_contrasts", "select_body_parts", "forward_sop_classes", "commitment_peers", "deliver_to", mode="before")
    @classmethod
    def _split_aes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("allowed_aes")
    @classmethod
    def _check_aes(cls, value: list[str]) -> list[str]:
        """``AE`` or ``AE@host`` (the host restriction is an IP address or name the peer must come from)."""
        checked = []
        for entry in value:
            title, _, host = entry.partition("@")
            if "@" in entry and not re.match(r"^[A-Za-z0-9.:_-]+$", host):
                raise ValueError(f"allowed_aes entry {entry!r} has an invalid host after '@'")
            checked.append(_check_ae_title(title, "allowed_aes entry") + (f"@{host}" if host else ""))
        return checked

    @field_validator("select_image_type_exclude", "select_body_parts")
    @classmethod
    def _check_code_strings(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """ImageType and BodyPartExamined values are code strings: letters, digits, space and
        underscore, at most 16 characters; upper case, each once."""
        bad = [v for v in value if not re.fullmatch(r"[A-Za-z0-9_ ]{1,16}", v)]
        if bad:
            what = "ImageType" if info.field_name == "select_image_type_exclude" else "BodyPartExamined"
            raise ValueError(f"{bad} are not {what} values (code strings: letters, digits, space, underscore, at most 16)")
        return list(dict.fromkeys(v.upper() for v in value))

    @field_validator("select_complex_component_exclude", "select_acquisition_contrasts")
    @classmethod
    def _check_terms(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Defined terms, told in any case; upper case, each once."""
        what, known = (("complex components", COMPONENTS) if info.field_name == "select_complex_component_exclude"
                       else ("MR contrasts", CONTRASTS))
        bad = [v for v in value if v.upper() not in known]
        if bad:
            raise ValueError(f"{bad} are not {what}; known: {list(known)}")
        return list(dict.fromkeys(v.upper() for v in value))

    @field_validator("select_orientations")
    @classmethod
    def _check_orientations(cls, value: list[str]) -> list[str]:
        known = {"axial", "sagittal", "coronal", "oblique"}
        bad = [v for v in value if v not in known]
        if bad:
            raise ValueError(f"unknown orientation(s) {bad}; known: {sorted(known)}")
        return value

    @field_validator("select_description_include", "select_description_exclude")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from exc
        return value

    @field_validator("forward_to")
    @classmethod
    def _check_forward_to(cls, value: str | None) -> str | None:
        if value is not None:
            parse_dicom_destination(value)
        return value

    @field_validator("forward_sop_classes")
    @classmethod
    def _check_sop_classes(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not UID_ROOT_RE.match(v + ".")]
        if bad:
            raise ValueError(f"not SOP Class UIDs: {bad}")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if self.forward_to and not self.forward_originals:
            raise ValueError("forward_to needs forward_originals = true (it says where originals are routed)")
        if self.forward_tls and not (self.forward_to and self.tls_ca_file):
            raise ValueError("forward_tls needs forward_to and tls_ca_file (the CA that signed the destination's certificate)")
        if self.forward_commitment and not self.forward_to:
            raise ValueError("forward_commitment needs forward_to = AE@host:port (the destination asked for storage commitment; "
                             "Orthanc over REST has no such service)")
        if self.forward_commitment and self.allowed_aes:
            title = parse_dicom_destination(str(self.forward_to))[0]
            if title not in [entry.partition("@")[0] for entry in self.allowed_aes]:
                raise ValueError(f"forward_commitment needs forward_to's AE title {title} in allowed_aes: the destination opens an "
                                 "association to the node to send its storage commitment reports")
        if self.deliver_commitment and not self.deliver_to:
            raise ValueError("deliver_commitment needs deliver_to (the modalities asked for storage commitment of what Orthanc "
                             "delivers to them)")
        if self.forward_sop_classes and not self.forward_originals:
            raise ValueError("forward_sop_classes needs forward_originals = true (those instances are only routed)")
        if self.ct_plane == "axial" and self.synthesis_plane == "acquired":
            raise ValueError("ct_plane axial needs synthesis_plane auto or axial: the sCT is written in the axial slices the generator "
                             "saw, and synthesis_plane acquired never shows it any")
        if 0 < self.spool_failed_retention_hours < self.spool_retention_hours:
            raise ValueError(f"spool_failed_retention_hours ({self.spool_failed_retention_hours:g}) is shorter than spool_retention_hours "
                             f"({self.spool_retention_hours:g}): a failed series, kept for its retry, would go before a series done")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key must be set together")
        if (self.api_tls_certificate is None) != (self.api_tls_private_key is None):
            raise ValueError("api_tls_certificate and api_tls_private_key must be set together")
        if (self.audit_syslog_certificate is None) != (self.audit_syslog_private_key is None):
            raise ValueError("audit_syslog_certificate and audit_syslog_private_key must be set together")
        tls_only = [name for name in ("audit_syslog_ca_file", "audit_syslog_certificate") if getattr(self, name) is not None]
        if tls_only and not (self.audit_syslog or "").startswith(SYSLOG_TLS_SCHEMES):
            raise ValueError(f"{' and '.join(tls_only)} {'need' if len(tls_only) > 1 else 'needs'} audit_syslog = tls://host:port or "
                             "relp+tls://host:port (the transports that use them)")
        for name in ("tls_certificate", "tls_private_key", "tls_ca_file", "api_tls_certificate", "api_tls_private_key",
                     "audit_syslog_ca_file", "audit_syslog_certificate", "audit_syslog_private_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path} does not exist")
        return self

    @field_validator("deliver_to")
    @classmethod
    def _check_deliver_to(cls, value: list[str]) -> list[str]:
        names = [entry.strip() for entry in value]
        bad = [name for name in names if not MODALITY_NAME_RE.match(name)]
        if bad:
            raise ValueError(f"{bad} are not Orthanc modality names (letters, digits, '_', '-', '.'; at most 64)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once")
        return names

    @field_validator("commitment_peers")
    @classmethod
    def _check_commitment_peers(cls, value: list[str]) -> list[str]:
        titles = [parse_dicom_destination(entry)[0] for entry in value]  # ValueError naming the entry
        twice = sorted({t for t in titles if titles.count(t) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once: one address per AE title")
        return [entry.strip() for entry in value]

    @field_validator("audit_syslog")
    @classmethod
    def _audit_syslog(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        match = re.fullmatch(r"(tls|udp|tcp|relp|relp\+tls)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})", value.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise ValueError(f"{value!r} is not tls://host:port, udp://host:port, tcp://host:port, relp+tls://host:port or "
                             "relp://host:port")
        return value.strip()

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        if not UID_ROOT_RE.match(value) or len(value) > 40:
            raise ValueError(f"{value!r} must be dotted digits ending with '.', at most 40 characters (room for the UID suffix)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"{value!r} is not a SQLAlchemy URL (e.g. sqlite:///var/mr2ct.db)")
        return value

    @field_validator("orthanc_url")
    @classmethod
    def _orthanc_url(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError(f"{value!r} must start with http:// or https://")
        return value.rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file or os.environ.get("MR2CT_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """Effective settings for display, secrets masked."""
        shown: dict[str, Any] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, SecretStr) or key.endswith("password"):
                shown[key] = "********" if value else None
            elif isinstance(value, Path):
                shown[key] = str(value)
            else:
                shown[key] = value
        url = shown.get("database_url", "")
        shown["database_url"] = re.sub(r"://([^:/@]+):([^@]+)@", r"://\1:********@", url)
        return shown


_config_file: str | None = None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read the settings; raise ``ConfigError`` naming the bad key(s)."""
    global _config_file
    if config_file is not None:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file {config_file} does not exist")
    elif os.environ.get("MR2CT_CONFIG") and not Path(os.environ["MR2CT_CONFIG"]).is_file():
        raise ConfigError(f"config file {os.environ['MR2CT_CONFIG']} (MR2CT_CONFIG) does not exist")
    _config_file = str(config_file) if config_file is not None else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if key:
                problems.append(f"{key} (MR2CT_{key.upper().split('.')[0]}): {err['msg']}")
            else:
                problems.append(str(err["msg"]).removeprefix("Value error, "))
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    except Exception as exc:  # a TOML syntax error, an unreadable file
        raise ConfigError(f"cannot read configuration: {exc}") from exc
    finally:
        _config_file = None
