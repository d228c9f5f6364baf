"""mr2ct's Orthanc plugin (runs inside Orthanc's embedded Python; standard library only).

- When an MR series becomes stable in Orthanc, it is sent to the mr2ct node by C-STORE
  (``MR2CT_AUTO_ROUTE``, default on; a user-metadata flag remembers it). A series it sent that
  becomes stable again has new instances (a late slice, a refused one stored mended): it is sent
  again, after the send under way if there is one.
- ``POST /mr2ct/synthesize/<series id>`` sends a series on demand (409 while a send of it runs
  or waits for its next attempt); Orthanc Explorer gets a "Synthesize CT" button on MR series
  pages that calls it. With ``MR2CT_NODE_API`` (the node's API, e.g. ``http://127.0.0.1:8800``)
  and ``MR2CT_NODE_API_TOKEN`` (a token of role ``requester``: ``mr2ct tokens create --role
  requester --name orthanc``) it asks the node's ``POST /synthesize`` instead, which takes the
  series as Orthanc holds it: a slice deleted here on purpose is left out of the sCT (sent by
  C-STORE, the node's own copy of it went in), and the node's refusal (not MR, several planes,
  a job of it under way) comes back to the button with its reason. The automatic route stays
  C-STORE. An ``https://`` address is checked against the system's CAs, or against
  ``MR2CT_NODE_API_CA_FILE`` (PEM; the CA that signed the node's ``api_tls_certificate``).
- A send that fails (the node down or restarting, the network gone) is sent again, as a new
  store job, after 2, 4, 8, ... seconds (at most five minutes apart), ``MR2CT_ROUTE_ATTEMPTS``
  times in all (default 20: about an hour, so that a node restarted, upgraded or moved to another
  host is caught up with; 8 gave up after four minutes). The series' ``Mr2ctRouted`` metadata says
  where it stands: ``sending``, ``retrying 2/20: <error>``, ``sent``, or ``failed after 20
  attempts: <error>`` (then the button sends it again). A series the node refuses (a C-STORE
  answered with a failure status, 0xA7xx out of resources aside) is not sent again: its metadata
  says ``refused by the node, not sent again: <Orthanc's error, with the status>``, the node's
  audit says why, and it is sent again once an instance of it is stored again (mended).
- Orthanc Explorer shows on an MR series page, under the button, where the series stands in the
  node (the ``Mr2ctOutcome`` metadata the node writes: not synthesized and why, queued, its sCT
  stored, failed and why; dicom_node.outcomes) and its ``Mr2ctRouted`` state, with a link to the
  sCT series the note names once Orthanc holds it.
- What the plugin still owes the node survives a restart of Orthanc: the MR series received but
  not yet stable, and the sends under way or waiting to retry, are kept in an Orthanc global
  property (``MR2CT_PENDING_PROPERTY``, default 7351; Orthanc keeps it in its index database).
  When Orthanc starts again the plugin follows a store job Orthanc kept (``SaveJobs``), or sends
  the series again, continuing its count of attempts; a series that had not become stable is sent
  once it has had ``StableAge`` seconds more without a new instance (one that gets new instances
  becomes stable, and is routed, as usual). Orthanc forgets which series were unstable when it
  stops, so without this such a series was never routed. Two Orthancs sharing one index database
  need different property numbers.

The node's DICOM modality is named by ``MR2CT_NODE_MODALITY`` (default ``mr2ct``) in Orthanc's
``DicomModalities``. The derived CT and SR come back into the same study through Orthanc's REST
API, so they are never routed again (only MR series arriving over DICOM or REST are routed).
Nor are the MR series the node received directly and routed here (``forward_originals``): it
synthesizes them already. It marks those it uploads over REST (``Mr2ctRouted`` says ``received
by mr2ct directly ...``), and the plugin marks so those whose instances came by C-STORE from the
node modality's AE title. Before 2026-12-04 each such series was synthesized twice.
"""

import json
import os
import re
import ssl
import threading
import urllib.error
import urllib.request

import orthanc  # provided by Orthanc's Python plugin

NODE_MODALITY = os.environ.get("MR2CT_NODE_MODALITY", "mr2ct")
AUTO_ROUTE = os.environ.get("MR2CT_AUTO_ROUTE", "true").strip().lower() in ("1", "true", "yes", "on")
ROUTED_FLAG = "Mr2ctRouted"  # declared in "UserMetadata" by the config
# a series the node received directly and routed here (dicom_node.orthanc_store.ROUTED_BY_NODE)
ROUTED_BY_NODE = "received by mr2ct directly, which routed the originals here: not sent back"


def _attempts(value):
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError("MR2CT_ROUTE_ATTEMPTS must be a whole number >= 1, got %r" % value)
    return int(value)


def _property(value):
    if not value.strip().isdigit() or not 1024 <= int(value) <= 65535:
        raise ValueError("MR2CT_PENDING_PROPERTY must be a whole number from 1024 to 65535 (Orthanc's range for plugins), got %r" % value)
    return int(value)


def _node_api(address, token):
    address = address.strip().rstrip("/")
    if not address:
        return "", ""
    if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", address):
        raise ValueError("MR2CT_NODE_API must be the node's API address, e.g. http://127.0.0.1:8800, got %r" % address)
    if not token.strip():
        raise ValueError("MR2CT_NODE_API is set but MR2CT_NODE_API_TOKEN is empty: give it a token of role requester "
                         "(mr2ct tokens create --role requester --name orthanc)")
    return address, token.strip()


def _ca_file(path, address):
    path = path.strip()
    if not path:
        return None
    if not address.startswith("https://"):
        raise ValueError("MR2CT_NODE_API_CA_FILE is set but MR2CT_NODE_API is not an https:// address, got %r" % address)
    if not os.path.isfile(path):
        raise ValueError("MR2CT_NODE_API_CA_FILE: file %s does not exist" % path)
    return path


ROUTE_ATTEMPTS = _attempts(os.environ.get("MR2CT_ROUTE_ATTEMPTS", "20"))
PENDING_PROPERTY = _property(os.environ.get("MR2CT_PENDING_PROPERTY", "7351"))
NODE_API, NODE_API_TOKEN = _node_api(os.environ.get("MR2CT_NODE_API", ""), os.environ.get("MR2CT_NODE_API_TOKEN", ""))
NODE_API_CA_FILE = _ca_file(os.environ.get("MR2CT_NODE_API_CA_FILE", ""), NODE_API)
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")  # what Orthanc names a series (a SHA-1 of its UIDs)
NODE_API_TIMEOUT = 300.0  # the node fetches the whole series from this Orthanc before it answers

_sends = {}  # Orthanc store job id -> (series id, attempt), for the sends of this process
_ended_early = {}  # job id -> succeeded, for a job whose end was signalled before send_series recorded it
_in_flight = {}  # series id -> attempt, while a send of it runs or waits for its next attempt
_changed_in_flight = set()  # series ids stable again while a send of them ran: sent again once it succeeds
_sent_update = {}  # series id -> its LastUpdate when this process last sent it (oldest first, bounded)
_pending = {}  # series id -> [attempt, store job id or None], saved in PENDING_PROPERTY; attempt 0: not yet stable
_saved = None  # what was owed when Orthanc last stopped, once read (at Orthanc's start, or by the first save)
_sends_lock = threading.Lock()
_timers = set()


def _load_saved():
    """Read the saved record once and merge it into _pending (before anything overwrites it: a
    series may arrive before Orthanc signals its start). Call under _sends_lock."""
    global _saved
    if _saved is None:
        _saved = _saved_pending()
        for series_id, entry in _saved.items():
            _pending.setdefault(series_id, entry)
    return _saved


def _owe(series_id, attempt=None, job=None):
    """Record (or, with attempt None, drop) what the plugin owes the node for a series and save it
    in Orthanc's database. Call under _sends_lock."""
    _load_saved()
    if attempt is None:
        if _pending.pop(series_id, None) is None:
            return
    else:
        _pending[series_id] = [attempt, job]
    orthanc.SetGlobalProperty(PENDING_PROPERTY, json.dumps(_pending))


def _series(series_id):
    return json.loads(orthanc.RestApiGet("/series/%s" % series_id))


def _is_mr2ct_output(tags):
    return (tags.get("Manufacturer") or "") == "mr2ct" or (tags.get("SeriesDescription") or "").startswith("sCT (mr2ct")


def _from_the_node(series):
    """Whether the node itself stored the series here by C-STORE (``forward_originals`` with
    ``forward_to`` this Orthanc): it synthesizes what it receives, so sending it back would make it
    synthesize the series twice. (Originals it routes over REST it marks itself.)"""
    instances = series.get("Instances") or []
    if not instances:
        return False
    try:
        node_aet = json.loads(orthanc.RestApiGet("/modalities/%s/configuration" % NODE_MODALITY)).get("AET")
        metadata = json.loads(orthanc.RestApiGet("/instances/%s/metadata?expand" % instances[0]))
    except Exception:
        return False
    return metadata.get("Origin") == "DicomProtocol" and bool(node_aet) and metadata.get("RemoteAET") == node_aet


def _mark(series_id, state):
    try:
        orthanc.RestApiPut("/series/%s/metadata/%s" % (series_id, ROUTED_FLAG), state[:1000])
    except Exception as exc:  # the series was deleted meanwhile
        orthanc.LogWarning("mr2ct: cannot mark series %s (%s): %s" % (series_id, state[:80], exc))


def send_series(series_id, attempt=1):
    """Submit a store job of the series to the node (``attempt`` of ROUTE_ATTEMPTS); on_job_ended
    follows its end."""
    if attempt == 1:
        _mark(series_id, "sending")  # before the job: its end, marked from another thread, comes after this
        try:
            update = _series(series_id).get("LastUpdate")
        except Exception:
            update = None
        with _sends_lock:
            _sent_update.pop(series_id, None)
            _sent_update[series_id] = update
            while len(_sent_update) > 10000:
                del _sent_update[next(iter(_sent_update))]
    body = json.dumps({"Resources": [series_id], "Synchronous": False, "Priority": 0})
    job = json.loads(orthanc.RestApiPost("/modalities/%s/store" % NODE_MODALITY, body))
    with _sends_lock:
        _sends[job["ID"]] = (series_id, attempt)
        _in_flight[series_id] = attempt
        _owe(series_id, attempt, job["ID"])
        early = _ended_early.pop(job["ID"], None)
    orthanc.LogWarning("mr2ct: series %s sent to %s (job %s, attempt %d)" % (series_id, NODE_MODALITY, job.get("ID"), attempt))
    if early is not None:
        on_job_ended(job["ID"], early)
    return job


def _send_again(series_id, attempt):
    with _sends_lock:
        _timers.difference_update([t for t in _timers if not t.is_alive()])
    try:
        send_series(series_id, attempt)
    except Exception as exc:  # Orthanc refused the job: the series deleted meanwhile, the modality removed
        with _sends_lock:
            _in_flight.pop(series_id, None)
            _owe(series_id)
        _mark(series_id, "failed: attempt %d could not be submitted: %s" % (attempt, exc))
        orthanc.LogError("mr2ct: sending series %s again failed: %s" % (series_id, exc))


def _routed_state(series_id):
    """The series' Mr2ctRouted metadata as text, None when it has none."""
    try:
        state = orthanc.RestApiGet("/series/%s/metadata/%s" % (series_id, ROUTED_FLAG))
    except Exception:
        return None
    return state.decode("utf-8", "replace") if isinstance(state, bytes) else str(state)


def route_stable(series_id, series):
    """A stable MR series: send it, unless the node itself stored it here. A series the plugin sent
    before that is stable again has had instances stored since (a late slice, a refused one sent
    again mended, the series sent again): it is sent again, so that the node makes its sCT from
    the whole series (until 2026-12-05 it was not, and the sCT lacked what came late)."""
    state = _routed_state(series_id)
    if state is None and _from_the_node(series):
        _mark(series_id, ROUTED_BY_NODE)
        state = ROUTED_BY_NODE
    if state is None:
        send_series(series_id)
        return
    if state != ROUTED_BY_NODE:
        with _sends_lock:
            sent_update = _sent_update.get(series_id)
            # Nothing stored since this process sent it (the button pressed before the series'
            # first stability): nothing new to send. Sent before Orthanc started: a stability now
            # means instances came since (Orthanc forgets unstable series when it stops).
            if sent_update is not None and (series.get("LastUpdate") or "") <= sent_update:
                return
            in_flight = series_id in _in_flight
            if in_flight:  # its send may have begun before the new instances: again once it succeeds
                _changed_in_flight.add(series_id)
        if not in_flight:
            orthanc.LogWarning("mr2ct: series %s has new instances since it was routed (%s): sending it again" % (series_id, state[:80]))
            send_series(series_id)
        return
    with _sends_lock:
        if _pending.get(series_id, [None])[0] == 0:
            _owe(series_id)


def _job_error(job_id):
    """Why a store job failed, and whether the node refused an instance: a C-STORE answered with a
    failure status other than 0xA7xx (out of resources), e.g. 0xA900 for an instance without Pixel
    Data. Sending that series again would be refused again; a connection that failed, a timeout or
    0xA7xx may pass later."""
    try:
        job = json.loads(orthanc.RestApiGet("/jobs/%s" % job_id))
    except Exception as exc:
        return "its job cannot be read: %s" % exc, False
    error = job.get("ErrorDescription") or "unknown error"
    details = job.get("ErrorDetails") or ""  # Orthanc's own words: 'C-STORE SCU to AET "MR2CT" has failed with DIMSE status 0xA900'
    if details:
        error = "%s (%s)" % (details, error)
    status = re.search(r"DIMSE status 0x([0-9A-Fa-f]{4})", details)
    return error, status is not None and not status.group(1).upper().startswith("A7")


def on_job_ended(job_id, succeeded):
    """A store job of ours ended: mark the series sent, or send it again after a backoff (a new
    job each time: Orthanc keeps only the last few finished jobs, so a failed one may be gone
    before it could be resubmitted)."""
    with _sends_lock:
        send = _sends.pop(job_id, None)
        if send is None:  # another job, one from before Orthanc started, or ours, not yet recorded
            _ended_early[job_id] = succeeded
            while len(_ended_early) > 256:
                del _ended_early[next(iter(_ended_early))]
            return
    series_id, attempt = send
    error, refused = None, False
    if not succeeded:
        error, refused = _job_error(job_id)
    with _sends_lock:
        if succeeded or refused or attempt >= ROUTE_ATTEMPTS:
            _in_flight.pop(series_id, None)
            _owe(series_id)
            changed = series_id in _changed_in_flight
            _changed_in_flight.discard(series_id)
        else:
            _owe(series_id, attempt + 1)  # what a restart resumes if it comes before the timer
    if succeeded:
        _mark(series_id, "sent")
        if changed:
            orthanc.LogWarning("mr2ct: series %s had new instances while it was sent: sending it again" % series_id)
            _send_again(series_id, 1)
        return
    if refused:
        _mark(series_id, "refused by the node, not sent again: %s" % error)
        orthanc.LogError("mr2ct: %s refused series %s (job %s, attempt %d), not sent again: %s" % (NODE_MODALITY, series_id, job_id, attempt, error))
        return
    if attempt >= ROUTE_ATTEMPTS:
        _mark(series_id, "failed after %d attempts: %s" % (attempt, error))
        orthanc.LogError("mr2ct: series %s not sent to %s after %d attempts (job %s): %s" % (series_id, NODE_MODALITY, attempt, job_id, error))
        return
    delay = min(300.0, 2.0 ** attempt)
    timer = threading.Timer(delay, _send_again, args=(series_id, attempt + 1))
    timer.daemon = True
    with _sends_lock:
        _timers.add(timer)
    _mark(series_id, "retrying %d/%d: %s" % (attempt + 1, ROUTE_ATTEMPTS, error))
    orthanc.LogWarning("mr2ct: sending series %s failed (job %s: %s); attempt %d of %d in %.0f s"
                       % (series_id, job_id, error, attempt + 1, ROUTE_ATTEMPTS, delay))
    timer.start()


def _stable_age():
    try:
        return float(json.loads(orthanc.GetConfiguration()).get("StableAge", 60))
    except Exception:
        return 60.0


def _saved_pending():
    """What the plugin owed the node when Orthanc last stopped: {series id: [attempt, job id]}."""
    try:
        saved = json.loads(orthanc.GetGlobalProperty(PENDING_PROPERTY, "{}") or "{}")
        return {str(series): [int(entry[0]), entry[1]] for series, entry in saved.items()}
    except Exception as exc:  # never let a damaged record stop Orthanc; say what is lost
        orthanc.LogError("mr2ct: the series owed to the node (global property %d) cannot be read, none are resumed: %s" % (PENDING_PROPERTY, exc))
        return {}


def _send_if_still_unstable_owed(series_id):
    """A series that had not become stable before Orthanc stopped: send it, unless something else
    has (it got new instances and became stable anew) or it is receiving again."""
    with _sends_lock:
        _timers.difference_update([t for t in _timers if not t.is_alive()])
        if _pending.get(series_id, [None])[0] != 0:
            return
    try:
        series = _series(series_id)
    except Exception:
        with _sends_lock:
            _owe(series_id)  # deleted meanwhile
        return
    if not series.get("IsStable", True):
        return  # receiving again: its STABLE_SERIES will route it
    route_stable(series_id, series)


def _resume_one(series_id, attempt, job_id):
    try:
        _series(series_id)
    except Exception:
        with _sends_lock:
            _owe(series_id)  # deleted while Orthanc was down
        return
    routed = _routed_state(series_id)
    if routed == "sent":
        with _sends_lock:
            _owe(series_id)
        return
    if attempt == 0:
        if not AUTO_ROUTE or routed is not None:  # routing off, or a state already (the node routed it here)
            with _sends_lock:
                _owe(series_id)
            return
        timer = threading.Timer(_stable_age(), _send_if_still_unstable_owed, args=(series_id,))
        timer.daemon = True
        with _sends_lock:
            _timers.add(timer)
        timer.start()
        return
    state = None
    if job_id:
        try:
            state = json.loads(orthanc.RestApiGet("/jobs/%s" % job_id)).get("State")
        except Exception:
            state = None  # Orthanc did not keep its jobs (SaveJobs false)
    if state is None:
        send_series(series_id, attempt)
        return
    with _sends_lock:  # Orthanc kept the job: follow it
        _sends[job_id] = (series_id, attempt)
        _in_flight[series_id] = attempt
        early = _ended_early.pop(job_id, None)
    if state in ("Success", "Failure"):
        early = state == "Success"
    if early is not None:
        on_job_ended(job_id, early)


def resume(saved):
    """Orthanc has started: carry on with what the plugin owed the node when it stopped."""
    if saved:
        orthanc.LogWarning("mr2ct: resuming %d series owed to %s from before Orthanc restarted" % (len(saved), NODE_MODALITY))
    for series_id, (attempt, job_id) in saved.items():
        try:
            _resume_one(series_id, attempt, job_id)
        except Exception as exc:  # one series' trouble must not stop the others
            orthanc.LogError("mr2ct: resuming series %s failed: %s" % (series_id, exc))


def on_change(change_type, level, resource_id):
    if change_type == orthanc.ChangeType.ORTHANC_STARTED:
        with _sends_lock:
            saved = dict(_load_saved())
        worker = threading.Thread(target=resume, args=(saved,), name="mr2ct-resume", daemon=True)
        worker.start()
        return
    if change_type == orthanc.ChangeType.NEW_SERIES and AUTO_ROUTE:
        try:  # owed from now on: Orthanc forgets an unstable series when it stops
            tags = _series(resource_id).get("MainDicomTags", {})
            if tags.get("Modality") == "MR" and not _is_mr2ct_output(tags):
                with _sends_lock:
                    if resource_id not in _pending:
                        _owe(resource_id, 0)
        except Exception as exc:
            orthanc.LogError("mr2ct: recording new series %s failed: %s" % (resource_id, exc))
        return
    if change_type in (orthanc.ChangeType.JOB_SUCCESS, orthanc.ChangeType.JOB_FAILURE):
        try:
            on_job_ended(resource_id, change_type == orthanc.ChangeType.JOB_SUCCESS)
        except Exception as exc:  # never let a routing problem take Orthanc down
            orthanc.LogError("mr2ct: following store job %s failed: %s" % (resource_id, exc))
        return
    if change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        with _sends_lock:
            for timer in _timers:
                timer.cancel()
        return
    if change_type != orthanc.ChangeType.STABLE_SERIES or not AUTO_ROUTE:
        return
    try:
        series = _series(resource_id)
        tags = series.get("MainDicomTags", {})
        if tags.get("Modality") != "MR" or _is_mr2ct_output(tags):
            return
        route_stable(resource_id, series)
    except Exception as exc:  # never let a routing problem take Orthanc down
        orthanc.LogError("mr2ct: routing series %s failed: %s" % (resource_id, exc))


def _refuse(output, status, message):
    # Debian's Python plugin 4.0 takes the body's size as a third argument (a TypeError without it);
    # SetHttpErrorDetails with SendHttpStatusCode answered an empty body, and the button's alert
    # showed no reason.
    output.SendHttpStatus(status, message, len(message.encode("utf-8")))


def _ask_node(series_uid):
    """POST /synthesize on the node's API. Returns (HTTP status, the answer's JSON or the refusal's
    reason); raises OSError when the node's API does not answer."""
    request = urllib.request.Request(NODE_API + "/synthesize", data=json.dumps({"series_uid": series_uid}).encode("utf-8"),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer " + NODE_API_TOKEN},
                                     method="POST")
    context = ssl.create_default_context(cafile=NODE_API_CA_FILE) if NODE_API.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=NODE_API_TIMEOUT, context=context) as answer:
            return answer.status, json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read().decode("utf-8")).get("detail")
        except Exception:
            detail = None
        return exc.code, detail if isinstance(detail, str) else (json.dumps(detail) if detail else str(exc.reason))


def _synthesize_by_api(output, series_id, series_uid):
    """The button with MR2CT_NODE_API: the node takes the series as Orthanc holds it. Its refusals
    of the series (404, 409, 422) are the button's; any other is the plugin's configuration or the
    node's trouble, answered 502 with what the node said."""
    try:
        status, answer = _ask_node(series_uid)
    except (OSError, ValueError) as exc:  # refused connection, timeout, an answer that is not JSON
        orthanc.LogError("mr2ct: the node's API at %s did not answer for series %s: %s" % (NODE_API, series_id, exc))
        _refuse(output, 502, "mr2ct's API at %s did not answer: %s" % (NODE_API, exc))
        return
    if status == 202:
        set_aside = answer.get("set_aside") or 0
        message = "mr2ct job %s: the synthetic CT of the series as Orthanc holds it (%d instances) will appear in this study." % (
            answer.get("job_id"), answer.get("instances") or 0)
        if set_aside:
            message += " %d instance%s the node had and Orthanc no longer holds %s left out." % (
                set_aside, "s" * (set_aside != 1), "are" if set_aside != 1 else "is")
        orthanc.LogWarning("mr2ct: series %s asked of %s: job %s" % (series_id, NODE_API, answer.get("job_id")))
        output.AnswerBuffer(json.dumps({"series": series_id, "asked": NODE_API, "job": answer.get("job_id"),
                                        "instances": answer.get("instances"), "set_aside": set_aside, "message": message}),
                            "application/json")
        return
    if status in (404, 409, 422):  # the node's reason as it gave it (the button's alert says "mr2ct: <status>" before it)
        _refuse(output, status, str(answer))
        return
    hint = " (MR2CT_NODE_API_TOKEN: a token of role requester)" if status in (401, 403) else ""
    orthanc.LogError("mr2ct: the node's API at %s answered %d for series %s: %s%s" % (NODE_API, status, series_id, answer, hint))
    _refuse(output, 502, "mr2ct's API at %s answered %d: %s%s" % (NODE_API, status, answer, hint))


def synthesize(output, uri, **request):
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    series_id = request["groups"][0]
    if not ORTHANC_ID.match(series_id):  # an Orthanc identifier, nothing that could make another REST path
        _refuse(output, 404, "no such series: %r is not an Orthanc series identifier" % series_id[:100])
        return
    with _sends_lock:
        attempt = _in_flight.get(series_id)
    if attempt is not None:  # sending it twice would make the node synthesize it twice
        _refuse(output, 409, "series %s is being sent to mr2ct already (attempt %d of %d)" % (series_id, attempt, ROUTE_ATTEMPTS))
        return
    try:
        series = _series(series_id)
    except Exception:
        _refuse(output, 404, "no such series: %s" % series_id)
        return
    tags = series.get("MainDicomTags", {})
    if tags.get("Modality") != "MR":
        _refuse(output, 400, "only MR series can be synthesized")
        return
    if NODE_API:
        _synthesize_by_api(output, series_id, tags.get("SeriesInstanceUID", ""))
        return
    job = send_series(series_id)
    output.AnswerBuffer(json.dumps({"series": series_id, "sent_to": NODE_MODALITY, "job": job.get("ID"),
                                    "message": "Sent to mr2ct; the synthetic CT will appear in this study."}), "application/json")


EXPLORER_JS = """
// The series a series page shows, from the address: Orthanc Explorer moves from one series to
// another by a change of hash, which fires no pagebeforeshow (the button of the MR series shown
// before stayed on a CT series' page until 2026-12-05).
function mr2ctSeriesShown() {
  var match = /^#series\\?(?:.*&)?uuid=([^&]+)/.exec(window.location.hash);
  return match ? decodeURIComponent(match[1]) : null;
}
// Where the series stands: the node's note (Mr2ctOutcome: not synthesized and why, queued, its
// sCT stored, failed and why) and this plugin's routing state (Mr2ctRouted), under the button, in
// that order whichever answer comes first; long UIDs wrap within the column.
function mr2ctShowStanding(seriesId) {
  $('#mr2ct-standing').remove();
  $('<div>').attr('id', 'mr2ct-standing').css({'overflow-wrap': 'anywhere', 'word-break': 'break-word'})
    .append($('<p>').attr('id', 'mr2ct-outcome').hide(), $('<p>').attr('id', 'mr2ct-routed').hide())
    .insertAfter($('#mr2ct-synthesize'));
  $.each([['Mr2ctOutcome', 'mr2ct-outcome', ''], ['Mr2ctRouted', 'mr2ct-routed', 'routing to mr2ct: ']], function(i, shown) {
    $.ajax({url: '../series/' + seriesId + '/metadata/' + shown[0], dataType: 'text',
            success: function(text) {
              if (mr2ctSeriesShown() !== seriesId) { return; }
              $('#' + shown[1]).text(shown[2] + text).show();
              var sct = i === 0 ? /CT series ([0-9.]+) /.exec(text) : null;
              if (sct) { mr2ctLinkTo(seriesId, sct[1]); }
            }});
  });
}
// A link to the sCT series the note names, when Orthanc holds it.
function mr2ctLinkTo(seriesId, sctUid) {
  $.ajax({url: '../tools/lookup', type: 'POST', data: sctUid, dataType: 'json', success: function(found) {
    var hit = $.grep(found, function(item) { return item.Type === 'Series'; })[0];
    if (!hit || mr2ctSeriesShown() !== seriesId) { return; }
    $('#mr2ct-sct').remove();
    // a change of hash, as Back and Forward make (a link to the page shown, #series, is not followed by jQuery Mobile)
    $('<a>').attr('id', 'mr2ct-sct').attr('href', '#series?uuid=' + hit.ID).text('open the synthetic CT')
      .click(function(e) { e.preventDefault(); window.location.hash = 'series?uuid=' + hit.ID; })
      .insertAfter($('#mr2ct-outcome'));
  }});
}
function mr2ctOfferSynthesis() {
  var seriesId = mr2ctSeriesShown();
  $('#mr2ct-synthesize, #mr2ct-standing').remove();
  if (seriesId === null) { return; }
  $.getJSON('../series/' + seriesId, function(series) {
    // an answer for a series no longer shown (the user moved on meanwhile) offers nothing
    if (mr2ctSeriesShown() !== seriesId || series.MainDicomTags.Modality !== 'MR') { return; }
    $('#mr2ct-synthesize').remove();
    var button = $('<a>').attr('id', 'mr2ct-synthesize').attr('data-role', 'button').attr('href', '#')
      .attr('data-icon', 'forward').attr('data-theme', 'e').text('Synthesize CT')
      .button().click(function(e) {
        e.preventDefault();
        $.ajax({url: '../mr2ct/synthesize/' + seriesId, type: 'POST', dataType: 'json',
                success: function(answer) { alert(answer.message); },
                error: function(x) { alert('mr2ct: ' + x.status + ' ' + x.responseText); }});
      });
    button.insertAfter($('#series-info'));
    mr2ctShowStanding(seriesId);
  });
}
$('#series').live('pagebeforeshow', mr2ctOfferSynthesis);
$(window).bind('hashchange', mr2ctOfferSynthesis);
"""

orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/mr2ct/synthesize/(.*)", synthesize)
orthanc.ExtendOrthancExplorer(EXPLORER_JS)
