"""mr2ct's Orthanc plugin (runs inside Orthanc's embedded Python; standard library only).

- When an MR series becomes stable in Orthanc, it is sent to the mr2ct node by C-STORE
  (``MR2CT_AUTO_ROUTE``, default on), once per series (a user-metadata flag remembers it).
- ``POST /mr2ct/synthesize/<series id>`` sends a series on demand; Orthanc Explorer gets a
  "Synthesize CT" button on MR series pages that calls it.

The node's DICOM modality is named by ``MR2CT_NODE_MODALITY`` (default ``mr2ct``) in Orthanc's
``DicomModalities``. The derived CT and SR come back into the same study through Orthanc's REST
API, so they are never routed again (only MR series arriving over DICOM or REST are routed).
"""

import json
import os

import orthanc  # provided by Orthanc's Python plugin

NODE_MODALITY = os.environ.get("MR2CT_NODE_MODALITY", "mr2ct")
AUTO_ROUTE = os.environ.get("MR2CT_AUTO_ROUTE", "true").strip().lower() in ("1", "true", "yes", "on")
ROUTED_FLAG = "Mr2ctRouted"  # declared in "UserMetadata" by the config


def _series(series_id):
    return json.loads(orthanc.RestApiGet("/series/%s" % series_id))


def _is_mr2ct_output(tags):
    return (tags.get("Manufacturer") or "") == "mr2ct" or (tags.get("SeriesDescription") or "").startswith("sCT (mr2ct")


def send_series(series_id):
    body = json.dumps({"Resources": [series_id], "Synchronous": False, "Priority": 0})
    job = json.loads(orthanc.RestApiPost("/modalities/%s/store" % NODE_MODALITY, body))
    orthanc.RestApiPut("/series/%s/metadata/%s" % (series_id, ROUTED_FLAG), "sent")
    orthanc.LogWarning("mr2ct: series %s sent to %s (job %s)" % (series_id, NODE_MODALITY, job.get("ID")))
    return job


def on_change(change_type, level, resource_id):
    if change_type != orthanc.ChangeType.STABLE_SERIES or not AUTO_ROUTE:
        return
    try:
        series = _series(resource_id)
        tags = series.get("MainDicomTags", {})
        if tags.get("Modality") != "MR" or _is_mr2ct_output(tags):
            return
        try:
            orthanc.RestApiGet("/series/%s/metadata/%s" % (resource_id, ROUTED_FLAG))
            return  # already routed once; the button re-sends on demand
        except Exception:
            pass
        send_series(resource_id)
    except Exception as exc:  # never let a routing problem take Orthanc down
        orthanc.LogError("mr2ct: routing series %s failed: %s" % (resource_id, exc))


def _refuse(output, status, message):
    # Debian's Python plugin 4.0 refuses SendHttpStatus(status, body); this pair works and the
    # message reaches the caller as Orthanc's error "Details" (HttpDescribeErrors).
    output.SetHttpErrorDetails(message, 1)
    output.SendHttpStatusCode(status)


def synthesize(output, uri, **request):
    if request["method"] != "POST":
        output.SendMethodNotAllowed("POST")
        return
    series_id = request["groups"][0]
    try:
        series = _series(series_id)
    except Exception:
        _refuse(output, 404, "no such series: %s" % series_id)
        return
    if series.get("MainDicomTags", {}).get("Modality") != "MR":
        _refuse(output, 400, "only MR series can be synthesized")
        return
    job = send_series(series_id)
    output.AnswerBuffer(json.dumps({"series": series_id, "sent_to": NODE_MODALITY, "job": job.get("ID")}), "application/json")


EXPLORER_JS = """
$('#series').live('pagebeforeshow', function() {
  var seriesId = $.mobile.pageData.uuid;
  $('#mr2ct-synthesize').remove();
  $.getJSON('../series/' + seriesId, function(series) {
    if (series.MainDicomTags.Modality !== 'MR') { return; }
    var button = $('<a>').attr('id', 'mr2ct-synthesize').attr('data-role', 'button').attr('href', '#')
      .attr('data-icon', 'forward').attr('data-theme', 'e').text('Synthesize CT')
      .button().click(function(e) {
        e.preventDefault();
        $.ajax({url: '../mr2ct/synthesize/' + seriesId, type: 'POST',
                success: function() { alert('Sent to mr2ct; the synthetic CT will appear in this study.'); },
                error: function(x) { alert('mr2ct: ' + x.status + ' ' + x.responseText); }});
      });
    button.insertAfter($('#series-info'));
  });
});
"""

orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/mr2ct/synthesize/(.*)", synthesize)
orthanc.ExtendOrthancExplorer(EXPLORER_JS)
