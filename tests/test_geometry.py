"""A physicist overlays the sCT on the MR: whatever the orientation, matrix or frame layout,
every CT slice lies exactly where its MR slice (or frame) lies."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from synthesis.volume import frame_geometry
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import series_datasets, study_series
from training.phantom_dicom import write_mr_series

CASES = {
    "axial-non-square-anisotropic": dict(orientation="axial", size=40, columns=56, pixel_spacing=4.5),
    "sagittal": dict(orientation="sagittal", size=48, columns=48, pixel_spacing=5.0),
    "coronal": dict(orientation="coronal", size=48, columns=40, pixel_spacing=5.0),
    "oblique": dict(orientation="oblique", size=48, columns=48, pixel_spacing=5.0),
    "legacy-enhanced-multiframe": dict(orientation="axial", size=48, columns=48, pixel_spacing=5.0, multiframe="legacy"),
    "enhanced-multiframe": dict(orientation="oblique", size=48, columns=48, pixel_spacing=5.0, multiframe="enhanced"),
}


def _to_multiframe(files: list[Path], folder: Path, kind: str) -> tuple[Path, str]:
    singles = [pydicom.dcmread(f) for f in files]
    series_uid = str(generate_uid())
    image = hd.legacy.LegacyConvertedEnhancedMRImage(
        singles, series_instance_uid=series_uid, series_number=5, sop_instance_uid=str(generate_uid()), instance_number=1,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if kind == "enhanced":  # the same functional-group layout under the Enhanced MR SOP class
        image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    folder.mkdir()
    path = folder / "multiframe.dcm"
    image.save_as(path, enforce_file_format=True)
    return path, series_uid


@pytest.mark.parametrize("case", list(CASES))
def test_every_ct_slice_lies_where_its_mr_slice_lies(case, node, orthanc, tmp_path):
    spec = dict(CASES[case])
    multiframe = spec.pop("multiframe", None)
    series = write_mr_series(tmp_path / "mr", seed=500 + list(CASES).index(case), slices=6, slice_spacing=9.0, **spec)
    series_uid, folder = series.series_uid, series.folder
    if multiframe:
        _, series_uid = _to_multiframe(series.files, tmp_path / "mf", multiframe)
        folder = tmp_path / "mf"
    # -R: propose exactly the SOP classes in the files (storescu's default list lacks Legacy Converted Enhanced MR)
    sent = storescu(folder, node.port, NODE_AE, SCANNER_AE, propose="-R")
    assert sent.returncode == 0 and not sent.stderr.strip(), sent.stderr
    job = wait_for_job(node.database_url, series_uid, timeout=120)
    assert job.state == "done", job.error

    mr_geometry = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        for frame, g in enumerate(frame_geometry(ds), start=1):
            mr_geometry[(ds.SOPInstanceUID, frame if "PerFrameFunctionalGroupsSequence" in ds else None)] = (g, ds)
    cts = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["Modality"] == "CT"
           and s["MainDicomTags"]["SeriesInstanceUID"] == job.ct_series_uid]
    assert len(cts) == 1
    ct_datasets = series_datasets(orthanc, cts[0])
    assert len(ct_datasets) == len(mr_geometry) == 6
    for ct in ct_datasets:
        ref = ct.SourceImageSequence[0]
        g, mr = mr_geometry[(ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None)]
        np.testing.assert_allclose([float(v) for v in ct.ImagePositionPatient], g.position, atol=1e-3)
        np.testing.assert_allclose([float(v) for v in ct.ImageOrientationPatient], g.orientation, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ct.PixelSpacing], g.pixel_spacing, atol=1e-6)
        assert (ct.Rows, ct.Columns) == (mr.Rows, mr.Columns)
        assert ct.FrameOfReferenceUID == mr.FrameOfReferenceUID == series.frame_of_reference_uid
