"""The DICOM Conformance Statement (PS3.2) of the node, made from the tables the node itself runs
on: the presentation contexts its SCP accepts and its router proposes, the statuses it answers,
the settings that change either, and the attributes of a CT and an SR built by its own writers.
``mr2ct conformance`` prints it; docs/conformance.md is its output, checked by the tests to be
current, and a test checks that a running node accepts exactly the contexts it lists.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

import synthesis
from dicom_node import atna
from dicom_node.commitment import MAX_ATTEMPTS as MAX_COMMITMENT_ATTEMPTS, STORAGE_COMMITMENT
from dicom_node.forward_commitment import BATCH as FORWARD_COMMITMENT_BATCH
from dicom_node.forwarder import LOSSLESS_REENCODE, MAX_CONTEXTS, STORED_STATUSES, UNCOMPRESSED_LITTLE_ENDIAN, requested_contexts
from dicom_node.ingest import MAX_GEOMETRY_VALUE, MAX_SEQUENCE_DEPTH, SUPPORTED_SOP_CLASSES
from dicom_node.recorder import MAX_BACKLOG, WINDOW_SECONDS as RECORD_WINDOW_SECONDS
from dicom_node.scp import (
    RELEASE_FLUSH_SECONDS, STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, supported_contexts,
)
from dicom_node.settings import Settings
from dicom_node.transport import NodeAE

VERIFICATION = "1.2.840.10008.1.1"

# What each C-STORE status the SCP answers means here (dicom_node/scp.py StoreSCP._on_store).
STATUS_MEANINGS = {
    STATUS_SUCCESS: ("Success", "the instance's bytes, exactly as received, are in the spool and fsynced (file and folder) "
                     "before the response is sent; its database row follows behind the spool (2.1): nothing acknowledged "
                     "is lost"),
    STATUS_OUT_OF_RESOURCES: ("Refused: Out of Resources", "the spool's disk has less free space than `spool_min_free_mb`, "
                              "a write to it failed, or the database is that many rows behind the spool (2.1); the sender "
                              "may retry later"),
    STATUS_DATASET_MISMATCH: ("Error: Data Set does not match SOP Class", "the data set's SOP Class or Instance UID differs "
                              "from the C-STORE request's, the SOP class is not one this node takes, or what a volume is "
                              "built from is missing or unusable: no Pixel Data, or fewer bytes than its rows, columns "
                              "and frames need; an implausible image size; an image position, orientation, pixel spacing "
                              f"or rescale value missing, not a number, or beyond {MAX_GEOMETRY_VALUE:g}; sequences "
                              f"nested deeper than {MAX_SEQUENCE_DEPTH}"),
    STATUS_CANNOT_UNDERSTAND: ("Error: Cannot understand", "a UID is missing or not a valid UI value (no UID from the wire "
                               "can steer a write outside the spool), or the data set cannot be parsed or stored; "
                               "the reason is in the node's log and audit trail, never in a patient-identifying form"),
}

_SETTINGS = Settings.model_fields


def _name(uid: str) -> str:
    return UID(uid).name


def _setting(key: str) -> str:
    field = _SETTINGS[key]
    default = field.default if field.default_factory is None else field.default_factory()
    shown = "unset" if default is None or default == [] else f"`{default}`"
    return f"`{key}` (env `MR2CT_{key.upper()}`, default {shown})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


SLICES = 3  # of the phantom series the statement's CT and SR are made from


def _built_objects() -> tuple[Dataset, Dataset, Dataset]:
    """A ``SLICES``-slice phantom MR series (its first slice returned), and the first CT and the SR the node's own writers make of it (zero HU,
    no inference: the attributes, not the pixels, are what this is for)."""
    from synthesis.ct_writer import SyntheticCTSeries
    from synthesis.model_file import default_model_path, load_model
    from synthesis.sr_writer import build_provenance_sr
    from synthesis.volume import assemble
    from training.phantom_dicom import write_mr_series

    with tempfile.TemporaryDirectory(prefix="mr2ct-conformance-") as folder:
        series = write_mr_series(Path(folder), seed=1, slices=SLICES, size=16, pixel_spacing=8.0, slice_spacing=8.0)
        mr = [pydicom.dcmread(f) for f in series.files]
    source = assemble(mr)
    model = load_model(default_model_path())
    root = _SETTINGS["uid_root"].default
    ct = SyntheticCTSeries(source=source, hu=np.zeros(source.volume.voxels.shape, np.float32), model=model, uid_root=root, device_label="cpu")
    sr = build_provenance_sr(ct=ct, mr_headers=source.headers, uid_root=root, processing_seconds=1.0, device_label="cpu")
    return source.headers[0], ct.dataset(0), sr


# Values shown as written (the same for every series); every other attribute's column says where it comes from.
_SHOWN = {
    "SOPClassUID", "Modality", "ImageType", "SyntheticData", "BurnedInAnnotation", "PhotometricInterpretation", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "Manufacturer", "ManufacturerModelName", "CompletionFlag", "VerificationFlag", "ValueType", "ContinuityOfContent",
    "SpecificCharacterSet", "LossyImageCompression", "PreliminaryFlag", "ConversionType",
}
_DERIVED_UIDS = {"SeriesInstanceUID", "SOPInstanceUID"}


def _attribute_rows(ds: Dataset, mr: Dataset, shown: frozenset[str] = frozenset()) -> list[list[str]]:
    """One row per top-level attribute of ``ds``; ``shown``: more attributes whose value is fixed."""
    rows = []
    for element in ds:
        keyword = element.keyword or "(private)"
        tag = f"({element.tag.group:04X},{element.tag.element:04X})"
        if keyword in ("SourceImageSequence", "ReferencedImageSequence"):
            source = "sequence, 1 item: the MR slice this CT slice was made from"
        elif keyword == "ContentSequence":
            source = "the content tree above"
        elif element.VR == "SQ":
            source = f"sequence, {len(element.value)} item{'s' if len(element.value) != 1 else ''}"
        elif keyword in _DERIVED_UIDS:
            source = "derived by mr2ct from `uid_root`, the MR series and the model (re-running a job rewrites the same UIDs)"
        elif element.value in (None, ""):
            source = "empty (type 2)"
        elif keyword in _SHOWN or keyword in shown:
            value = element.value
            text = "\\".join(str(v) for v in value) if isinstance(value, (list, pydicom.multival.MultiValue)) else str(value)
            source = f"`{_name(text) if keyword == 'SOPClassUID' else text}`"
        elif keyword == "BodyPartExamined":
            source = "what every MR slice names: their one part; `HEADNECK` for HEAD and NECK slices, HEAD for HEAD and BRAIN; absent where no one term covers the parts"
        elif keyword == "PixelData":
            source = f"the synthetic CT: HU minus the rescale intercept, unsigned, {ds.BitsStored} of {ds.BitsAllocated} bits"
        elif keyword in mr and mr[keyword].value == element.value:
            source = "copied from the MR"
        else:
            source = "written by mr2ct"
        rows.append([keyword, tag, element.VR, source])
    return rows


def _sr_content_rows(sr: Dataset, slices: int) -> list[list[str]]:
    rows: list[list[str]] = []
    counts: dict[tuple[str, str, str], int] = {}

    def walk(items: Any, depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            key = (str(depth), f"{item.RelationshipType}" if "RelationshipType" in item else "", f"{item.ValueType} {name}")
            if key not in counts:
                rows.append([key[0], key[1], item.ValueType, name])
            counts[key] = counts.get(key, 0) + 1
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    walk(sr.ContentSequence, 1)
    for row in rows:
        n = counts[(row[0], row[1], f"{row[2]} {row[3]}")]
        row.append("one per slice" if row[2] == "IMAGE" and n == slices else str(n))
    return rows


def statement() -> str:
    """The conformance statement as Markdown (deterministic: the same code gives the same text)."""
    version = synthesis.__version__
    mr, ct, sr = _built_objects()
    ae = NodeAE("MR2CT")
    parts = [f"""# mr2ct {version}: DICOM Conformance Statement

Made by `mr2ct conformance` from the tables the node runs on (`dicom_node/conformance.py`); do not
edit it by hand: `tests/test_conformance.py` fails when it differs from the command's output, and
checks that a running node accepts exactly the presentation contexts listed in 2.2.1.

## 1. Overview

mr2ct receives MR series over DICOM (C-STORE SCP), makes a synthetic CT series of each selected
series with a CycleGAN generator, and stores the CT series and a DICOM Structured Report of its
provenance into Orthanc over Orthanc's REST API (HTTP, not DICOM networking). Optionally it routes
every received instance on to another DICOM AE (C-STORE SCU), and, with {_setting("deliver_to")},
has Orthanc send each sCT series and its SR on to modalities declared in Orthanc (a treatment
planning system, say: the C-STORE is Orthanc's, by its own configuration and conformance; with
{_setting("deliver_commitment")} Orthanc asks those modalities for storage commitment too, as its
Storage Commitment SCU, and the node counts a delivery only once they committed every instance).

{_table(["SOP class", "SOP Class UID", "SCU", "SCP"], [
    [_name(VERIFICATION), VERIFICATION, "yes, when routing (`forward_to`)", "yes"],
    *([_name(c), str(c), "yes, when routing (`forward_to`)", "yes"] for c in SUPPORTED_SOP_CLASSES),
    [_name(STORAGE_COMMITMENT), STORAGE_COMMITMENT, "yes, toward `forward_to` with `forward_commitment`", "yes (`commitment_peers`)"],
    [_name(str(ct.SOPClassUID)), str(ct.SOPClassUID), "created; stored in Orthanc over REST", "no"],
    [_name(str(sr.SOPClassUID)), str(sr.SOPClassUID), "created; stored in Orthanc over REST", "no"],
])}

No media interchange (the spool is the node's own storage, not DICOM media).

## 2. Networking

### 2.1 Implementation model

One application entity, the node's AE (title {_setting("ae_title")}), listens on
{_setting("dicom_host")} port {_setting("dicom_port")}. For each C-STORE it validates the data set
against the request, writes the bytes as received to its spool behind a PS3.10 file meta header,
fsyncs file and folder and only then answers Success; the instances' database rows are committed
behind the spool in groups (within {RECORD_WINDOW_SECONDS * 1000:.0f} ms), those of an association before its
A-RELEASE is answered (waiting at most {RELEASE_FLUSH_SECONDS:.0f} s: with the database away, the
release is answered and the rows follow once it is back; start-up recovery records any spooled
instance whose row was lost), and with {MAX_BACKLOG:,} rows waiting an instance is refused (Out of
Resources). What it writes beside the instances while its database is away (a refused instance's
audit row and the refusal its series waits for, a rejected association's audit row, an
association's row) is kept in a journal beside the spool, fsynced, and written with the times it
happened once the database answers (after a crash: at the next start). A series is
complete when no instance of it arrived for {_setting("stable_seconds")} seconds (or, with
{_setting("complete_on_release")}, when the association that sent it is released); a worker then
synthesizes it and stores the CT series and the SR into Orthanc ({_setting("orthanc_url")}).
With {_setting("forward_originals")} the router also sends every received instance to Orthanc,
or, with {_setting("forward_to")}, by C-STORE to any AE, retrying with backoff.

Implementation Class UID: `{synthesis.IMPLEMENTATION_CLASS_UID}` (a 2.25 UID, PS3.5 B.2).
Implementation Version Name: `{synthesis.IMPLEMENTATION_VERSION_NAME}`.
Both are sent in every association the node accepts or requests, and written into the file meta
information of every file it writes (the spool, the CT, the SR, the phantoms of `mr2ct phantoms`).

### 2.2 AE specifications

#### 2.2.1 Storage SCP

Association acceptance:

- Calling AE titles: only those in {_setting("allowed_aes")} (`AE` or `AE@host`: that title
  from that host only); an empty list accepts any. Others are rejected (permanent, reason
  "calling AE title not recognized") and recorded as a security alert in the audit trail.
- Called AE title: checked with {_setting("check_called_ae")} (rejected permanent, reason
  "called AE title not recognized", and audited); otherwise any, as dcmtk's storescp and
  Orthanc by default.
- At most {_setting("max_associations")} associations at once; more are rejected (transient,
  "local limit exceeded") and audited.
- Maximum PDU size received: unlimited (0). Asynchronous operations: not negotiated (one
  outstanding operation). Extended negotiation: not supported on the associations it accepts;
  SCP/SCU role selection only for Storage Commitment Push Model with
  {_setting("forward_commitment")}, where the routing destination's proposal to take the SCP role
  (to send its storage commitment reports) is accepted; elsewhere the default roles.
- Timeouts (pynetdicom's): ACSE {ae.acse_timeout:g} s, DIMSE {ae.dimse_timeout:g} s, network {ae.network_timeout:g} s.
- DICOM over TLS when {_setting("tls_certificate")} and {_setting("tls_private_key")} are set;
  with {_setting("tls_ca_file")} callers must present a certificate it signed.

Presentation contexts accepted (each transfer syntax of a row in a context of its own or
several together; the SCP chooses the first of a context's syntaxes it accepts):

{_table(["Abstract syntax", "UID", "Transfer syntaxes", "Role"], [
    [_name(c), c, ", ".join(f"{_name(ts)} `{ts}`" for ts in syntaxes), "SCP"] for c, syntaxes in supported_contexts()
])}

SOP classes in {_setting("forward_sop_classes")} are accepted too, in the same transfer
syntaxes, to be routed only (never synthesized); they need {_setting("forward_originals")}.

C-STORE statuses returned:

{_table(["Status", "Meaning", "When"], [[f"0x{code:04X}", meaning, when] for code, (meaning, when) in STATUS_MEANINGS.items()])}

Every refusal is also an audit row (`dicom-instance-refused`) with the status and the reason.
A series with a refused instance is not synthesized from the rest (an sCT with a slice missing):
once stable it is set aside (`ignored`, the reason naming the refusal) until the refused SOP
Instance UIDs have been stored, by a re-send of them or of the series, or an administrator asks
for the series as Orthanc holds it (the admin API's POST /synthesize). An instance acknowledged
whose database row the database then refuses (a value it will not store: a defect) holds back no
other row: it stays in the spool, is audited (`dicom-instance-not-recorded`), and its series waits
for it in the same way.
Storage level: 2 (full); the spool keeps every element as received, private ones included, and
the synthesis reads the pixels in any of the accepted syntaxes (compressed ones decoded with
pydicom's plugins). The node is not an archive: with {_setting("spool_retention_hours")} an
original is deleted from the spool that long after it arrived, once its series' newest job is
done (or the series was ignored) and, when routing, it reached the destination; with
{_setting("spool_failed_retention_hours")} the originals of a series whose job failed or was cancelled go too,
that long after its job ended (a retry then asks for the series to be sent again), and so do those
of a series set aside for a refused instance, that long after they arrived.

Storage commitment (Storage Commitment Push Model, SCP, as IHE RAD-10): an N-ACTION (Action Type
1) from a calling AE in {_setting("commitment_peers")} (`AE@host:port`) is answered 0x0000 and
recorded (migration 0021); the node then reports by N-EVENT-REPORT (Event Type 1: all committed,
2: some failed) on an association it requests to that address, proposing Storage Commitment Push
Model (Implicit VR Little Endian and the others above) with SCP/SCU role selection taking the SCP
role. An instance is committed when the node holds it durably: its row, not purged by retention,
its file in the spool, of the SOP class asked (Retrieve AE Title: the node's); otherwise Failure
Reason 0x0112 (no such object instance) or 0x0119 (class/instance conflict). A report the requester
does not take is sent again with a growing pause, {MAX_COMMITMENT_ATTEMPTS} times in all, and given up
(audited) after that. A request from an AE not listed is refused 0x0110 (no address to report
to), one that is malformed 0x0115 (a bad argument), 0x0123 (another action), 0x0118 or 0x0112 (another
SOP class or instance), all with an Error Comment and an audit row.

#### 2.2.2 Routing SCU (`forward_to`)

Used when {_setting("forward_to")} names an AE (`AE@host:port`); the node's AE title calls.
One association per pass of the router, at most {MAX_CONTEXTS} presentation contexts; for each
(SOP class, transfer syntax) of the instances due it proposes the contexts below, and one more
for Verification (Implicit VR Little Endian) so that a destination taking none of them still
makes an association, released in good order, rather than one that is aborted:

{_table(["Instances received in", "Contexts proposed (one row each)"], [
    [_name(ts), "<br>".join(", ".join(_name(s) for s in syntaxes) for _c, syntaxes in requested_contexts({(str(next(iter(SUPPORTED_SOP_CLASSES))), str(ts))}))]
    for ts in (UNCOMPRESSED_LITTLE_ENDIAN[0], "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.2")
])}

An instance goes in the syntax it came in when the destination accepted it; otherwise decoded
to explicit VR little endian, or, when the destination takes the SOP class only compressed,
re-encoded losslessly in the first of {", ".join(ts.name for ts in LOSSLESS_REENCODE) or "(no encoder installed)"}
it accepted that can encode the pixels. Those syntaxes are proposed (one context each) only for a
SOP class the destination accepted in none of the contexts above: an association that leaves
instances of a SOP class no way to go is released, and asked again with them at once; the node
remembers it for that destination until it restarts. The same SOP Instance UID either way; the spool keeps the
original. Statuses {", ".join(f"0x{s:04X}" for s in sorted(STORED_STATUSES))} count as stored; any
other status is a refusal, retried with backoff and given up after {_setting("forward_max_refusals")}
refusals (listed by the admin API's GET /routing until POST /routing/retry). An unreachable
destination is retried without limit. DICOM over TLS with {_setting("forward_tls")}.

Storage commitment of what was routed (Storage Commitment Push Model, SCU, IHE RAD-10), with
{_setting("forward_commitment")}: the node asks the destination by N-ACTION (Action Type 1, on an
association of its own proposing that SOP class in Implicit VR Little Endian and the others of
pynetdicom's defaults) for up to {FORWARD_COMMITMENT_BATCH} routed originals per request, under a
Transaction UID made under {_setting("uid_root")}, and takes the N-EVENT-REPORT (Event Type 1 or 2)
on that association (held open up to {_setting("forward_commitment_linger_seconds")} seconds after the
N-ACTION's response, less once the report came either way) or on one the destination opens to the Storage SCP (its AE title must be in
{_setting("allowed_aes")} when that is set; the SCP role it proposes by role selection is accepted).
An original the report commits may then be deleted by spool retention; one it lists as failed (any
Failure Reason) is routed again, and asked for again once routed, each failure counted as a refusal
(given up after {_setting("forward_max_refusals")}, and kept); one it names neither way, or of a
request unanswered for {_setting("forward_commitment_wait_seconds")} seconds, is asked for again
in a new request (a late report still counts). N-EVENT-REPORT statuses returned: 0x0000; 0x0110 a
calling AE other than the destination's; 0x0115 an unknown Transaction UID or an item without a
valid UID; 0x0113 another Event Type; 0x0118 or 0x0112 another SOP class or instance (each with an
audit row). Without {_setting("forward_commitment")} C-STORE success is taken as enough.

### 2.3 Network interfaces

TCP/IP (IPv4) on the address and port above; TLS as above. The admin API (HTTP, or HTTPS with
{_setting("api_tls_certificate")}; bearer tokens) listens on {_setting("api_host")} port {_setting("api_port")}.

## 3. Objects created

### 3.1 Synthetic CT ({_name(str(ct.SOPClassUID))})

One instance per MR slice, in the MR's study and frame of reference, each overlaying the MR
slice it came from; explicit VR little endian. With `ct_plane = axial`, the sCT is written as
transverse slices instead: a series the generator saw as axial slices (a 3D sagittal or coronal
MR) as those slices (the same voxels, in patient space where the MR has them), a tilted series
resampled (trilinear) onto exact transverse slices (-1000 HU where the MR does not reach); each
references every MR slice in its Source Image Sequence, its Slice Thickness is the axial
slices' spacing, and its Image Orientation (Patient) is the one a CT scanner writes for the MR's
Patient Position (PS3.17 FFF.1.2.2: `1\\0\\0\\0\\1\\0` head first supine and where the MR names
none, `-1\\0\\0\\0\\-1\\0` head first prone, `-1\\0\\0\\0\\1\\0` feet first supine, and so on for
all eight). The attributes of an
instance written per MR slice (a phantom MR
series as the source; "copied from the MR" means equal to the source slice's value):

{_table(["Attribute", "Tag", "VR", "Value or source"], _attribute_rows(ct, mr))}

### 3.2 Provenance SR ({_name(str(sr.SOPClassUID))})

One per synthesized series, in the MR's study, built with highdicom. Its content tree (depth,
relationship, value type, concept; repeated items counted):

{_table(["Depth", "Relationship", "Value type", "Concept name", "Items"], _sr_content_rows(sr, SLICES))}

Top-level attributes:

{_table(["Attribute", "Tag", "VR", "Value or source"], _attribute_rows(sr, mr, frozenset({"InstanceNumber"})))}

## 4. Character sets

Any Specific Character Set is accepted and kept in the spool as received. The CT and the SR copy
the source MR's Specific Character Set with the patient and study attributes they copy (code
extensions included, with the empty first value Japanese and Korean sites send, e.g.
`\\ISO 2022 IR 87`); the text mr2ct writes itself is ASCII. Their dates and times are in the MR's
Timezone Offset From UTC when it has one (copied), else in the node host's local time; date-times
carry their offset, but for an offset of zero (UTC), which dcmtk 3.6.7's reader refuses: they are then
in the zone the dates and times are in.

## 5. Security

Calling AE titles checked (bound to hosts where configured), DICOM over TLS with optional client
certificates, UIDs validated before they name a file in the spool, an audit trail of every
association, refusal, job and audit read; no patient identifiers in log lines. The admin API
needs a bearer token on every route but /health.

With {_setting("audit_syslog")} the audit trail goes to an audit record repository (IHE ATNA) as
DICOM audit messages (PS3.15 A.5.1) in RFC 5424 syslog, over TLS (RFC 5425, with
{_setting("audit_syslog_ca_file")} and the node's {_setting("audit_syslog_certificate")}), UDP
(RFC 5426), plain TCP, or RELP (rsyslog's Reliable Event Logging Protocol, in TLS or plain: each
message answered by the repository, a batch not answered whole sent again): facility 10, severity 5, MSGID `IHE+RFC-3881`; AuditSourceID
{_setting("audit_source_id")} (default the AE title), AuditEnterpriseSiteID
{_setting("audit_enterprise_site_id")}, Audit Source Type 4. Each event names the studies it
concerns (Study Instance UID, role Report) and their patients (Patient Number). The events sent,
from mr2ct's audit actions (others, the node's own work such as a series becoming stable or a job
starting, stay in its audit table):

""" + _table(["mr2ct audit action", "Event ID (DCM)", "Event Type Code (DCM)", "Action"], [
        [f"`{action}`", f"{event[0]} {event[1]}", f"{kind[0]} {kind[1]}" if kind else "-", code]
        for action, (event, kind, code) in atna.EVENTS.items()]) + """

An association that stored nothing is not sent (a C-ECHO), unless it was rejected (Security Alert,
Node Authentication); a token the API or the dashboard refused is sent as User Authentication,
Login, outcome 4.
"""]
    return "\n".join(parts).rstrip() + "\n"
