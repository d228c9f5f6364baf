"""A physicist overlays the sCT on the MR: whatever the orientation, matrix or frame layout,
every CT slice lies exactly where its MR slice (or frame) lies."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.demo import wait_for_job
from dicom_node.local_stack import storescu
from synthesis.sr_writer import read_provenance
from synthesis.volume import (SCANNER_TRANSVERSE, TRANSVERSE, Volume, assemble, axial_reslice, frame_geometry, reoriented, resample,
                              scanner_transverse, transverse_grid)
from training import phantoms
from tests.conftest import NODE_AE, SCANNER_AE
from tests.helpers import dciodvfy, series_datasets, study_series
from training.phantom_dicom import write_mr_series

CASES = {
    "axial-non-square-anisotropic": dict(orientation="axial", size=40, columns=56, pixel_spacing=4.5),
    "sagittal": dict(orientation="sagittal", size=48, columns=48, pixel_spacing=5.0),
    "coronal": dict(orientation="coronal", size=48, columns=40, pixel_spacing=5.0),
    "oblique": dict(orientation="oblique", size=48, columns=48, pixel_spacing=5.0),
    # a 3D acquisition (slices as far apart as the pixels, the whole head): the generator sees it as axial slices
    "sagittal-3d-resliced": dict(orientation="sagittal", size=48, columns=40, pixel_spacing=5.0, slices=40, slice_spacing=5.0),
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
    slices, slice_spacing = spec.pop("slices", 6), spec.pop("slice_spacing", 9.0)
    series = write_mr_series(tmp_path / "mr", seed=500 + list(CASES).index(case), slices=slices, slice_spacing=slice_spacing, **spec)
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
    assert len(ct_datasets) == len(mr_geometry) == slices
    # the plane the generator saw is in the CT's derivation and the SR (and new UIDs come with it)
    plane = "axial slices resliced from the sagittal acquisition" if case.endswith("-resliced") else "the acquired slices"
    assert all(("resliced from" in ct.DerivationDescription) == case.endswith("-resliced") for ct in ct_datasets)
    (sr_series,) = [s for s in study_series(orthanc, series.study_uid) if s["MainDicomTags"]["SeriesInstanceUID"] == job.sr_series_uid]
    assert read_provenance(series_datasets(orthanc, sr_series)[0]).parameters["slice_plane"] == plane
    for ct in ct_datasets:
        ref = ct.SourceImageSequence[0]
        g, mr = mr_geometry[(ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None)]
        np.testing.assert_allclose([float(v) for v in ct.ImagePositionPatient], g.position, atol=1e-3)
        np.testing.assert_allclose([float(v) for v in ct.ImageOrientationPatient], g.orientation, atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ct.PixelSpacing], g.pixel_spacing, atol=1e-6)
        assert (ct.Rows, ct.Columns) == (mr.Rows, mr.Columns)
        assert ct.FrameOfReferenceUID == mr.FrameOfReferenceUID == series.frame_of_reference_uid


def _as_acquired_and_as_axial(series, node, node_factory, orthanc):
    """``series`` synthesized by the module's node (ct_plane acquired) and by a node with ct_plane
    axial: both jobs, done, and the study's series in Orthanc by Series Instance UID."""
    jobs = []
    for target in (node, node_factory(ct_plane="axial")):
        assert storescu(series.folder, target.port, NODE_AE, SCANNER_AE).returncode == 0
        job = wait_for_job(target.database_url, series.series_uid, timeout=120)
        assert job.state == "done", job.error
        jobs.append(job)
    return jobs[0], jobs[1], {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in study_series(orthanc, series.study_uid)}


def test_ct_plane_axial_writes_a_3d_sagittal_mrs_sct_as_transverse_slices_of_the_same_voxels(node, node_factory, orthanc, tmp_path):
    """A planning system takes a CT as transverse slices; a 3D sagittal T1 (the usual brain MR)
    gave a sagittal sCT. With ``ct_plane = axial`` the node writes the axial slices the generator
    saw: every voxel where the sagittal sCT of the same series has it (sampled in patient space,
    no interpolation), each slice derived from every MR slice, dciodvfy clean, its own UIDs."""
    series = write_mr_series(tmp_path / "mr", seed=531, orientation="sagittal", size=48, columns=40, pixel_spacing=5.0,
                             slices=40, slice_spacing=5.0)
    sagittal_job, axial_job, in_study = _as_acquired_and_as_axial(series, node, node_factory, orthanc)
    assert axial_job.ct_series_uid != sagittal_job.ct_series_uid
    sagittal_ct = series_datasets(orthanc, in_study[sagittal_job.ct_series_uid])
    axial_ct = series_datasets(orthanc, in_study[axial_job.ct_series_uid])
    assert len(sagittal_ct) == 40 and len(axial_ct) == 48  # the MR's rows run head to foot: one axial slice each
    for ct in axial_ct:
        np.testing.assert_allclose([float(v) for v in ct.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-6)
        assert (ct.Rows, ct.Columns) == (40, 40) and ct.FrameOfReferenceUID == series.frame_of_reference_uid
        assert {r.ReferencedSOPInstanceUID for r in ct.SourceImageSequence} == {pydicom.dcmread(f).SOPInstanceUID for f in series.files}
        assert "written as axial slices" in ct.DerivationDescription
    sagittal_volume, axial_volume = assemble(sagittal_ct).volume, assemble(axial_ct).volume
    sampled = resample(sagittal_volume, axial_volume)
    assert not np.isnan(sampled).any() and np.abs(sampled - axial_volume.voxels).max() < 0.01
    assert axial_volume.voxels.std() > 100  # a head, not a blank
    path = tmp_path / "axial-ct.dcm"
    axial_ct[len(axial_ct) // 2].save_as(path, enforce_file_format=True)
    errors, _, _ = dciodvfy(path)
    assert errors == [], errors
    (sr_series,) = [s for uid, s in in_study.items() if uid == axial_job.sr_series_uid]
    provenance = read_provenance(series_datasets(orthanc, sr_series)[0])
    assert provenance.parameters["slice_plane"] == "axial slices resliced from the sagittal acquisition, written as axial slices"


def test_ct_plane_axial_resamples_a_tilted_series_onto_exact_transverse_slices(node, node_factory, orthanc, tmp_path):
    """An axial series tilted 20 degrees (AC-PC aligned, as brain series often are) was written
    tilted; with ``ct_plane = axial`` its sCT is resampled onto exact transverse slices at the MR's
    spacing, covering the whole MR: each voxel the sCT the node writes in the MR's own slices has
    there (within the rounding to whole HU), air where the tilted MR does not reach."""
    series = write_mr_series(tmp_path / "mr", seed=532, orientation="oblique", size=48, pixel_spacing=5.0, slices=14, slice_spacing=5.0)
    tilted_job, axial_job, in_study = _as_acquired_and_as_axial(series, node, node_factory, orthanc)
    tilted = assemble(series_datasets(orthanc, in_study[tilted_job.ct_series_uid])).volume
    axial_ct = series_datasets(orthanc, in_study[axial_job.ct_series_uid])
    for ct in axial_ct:
        assert [float(v) for v in ct.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert "resampled (trilinear) onto transverse slices" in ct.DerivationDescription
    axial = assemble(axial_ct).volume
    assert axial.pixel_spacing == (5.0, 5.0) and axial.slice_spacing == pytest.approx(5.0)
    sampled = resample(tilted, axial)
    inside = ~np.isnan(sampled)
    assert 0.25 < inside.mean() < 0.9  # the tilted slab fills part of the box around it (on a lattice: up to a slice more)
    assert np.abs(sampled[inside] - axial.voxels[inside]).max() <= 1.0 + 1e-3
    assert (axial.voxels[~inside] == -1000).all()
    path = tmp_path / "axial-ct.dcm"
    axial_ct[len(axial_ct) // 2].save_as(path, enforce_file_format=True)
    assert dciodvfy(path)[0] == []


def _grid_volume(grid) -> Volume:
    return grid.volume(phantoms.head_labels(3, grid))


@pytest.mark.parametrize("orientation", ["sagittal", "coronal"])
def test_a_3d_sagittal_or_coronal_head_reaches_the_generator_as_the_axial_slices_of_the_same_head(orientation):
    """The axial view of a 3D acquisition is the head an axial acquisition of the same points
    shows, voxel for voxel (an exchange of axes and flips, no interpolation: rows running
    posterior, columns to the patient's left, as the model learnt), and it goes back exactly."""
    sagittal = orientation == "sagittal"  # its slices along x; coronal: along y
    acquired = _grid_volume(phantoms.oriented_grid(orientation, 45 if sagittal else 55, 57, 55 if sagittal else 45, 4.0, 4.0))
    axial = _grid_volume(phantoms.oriented_grid("axial", 57, 55, 45, 4.0, 4.0))
    reslice, why = axial_reslice(acquired)
    assert reslice is not None and why == f"axial slices resliced from the {orientation} acquisition"
    seen = reslice.forward(acquired.voxels)
    assert seen.shape == axial.voxels.shape and reslice.pixel_spacing == (4.0, 4.0) and reslice.slice_spacing == 4.0
    assert (seen == axial.voxels).all() and len(np.unique(seen)) > 5  # the same head, every tissue where it was
    assert (reslice.back(seen) == acquired.voxels).all()


def test_an_axial_thick_slab_or_unevenly_spaced_series_goes_as_acquired_unless_asked():
    """What stays as acquired: axial series (the model's plane), 2D series with slices further apart than
    1.5x their pixels (resliced, every axial slice would be blurred across), thin slabs, slices not
    evenly spaced; ``acquired`` reslices nothing, ``axial`` every non-axial series with even spacing."""
    def volume(orientation: str, slices: int, spacing: float):
        return _grid_volume(phantoms.oriented_grid(orientation, slices, 60, 60, 4.0, spacing))

    assert axial_reslice(volume("axial", 40, 4.0)) == (None, "axial slices as acquired")
    thick = volume("sagittal", 30, 8.0)
    reslice, why = axial_reslice(thick)
    assert reslice is None and "8 mm apart, 2x the pixel spacing" in why
    assert axial_reslice(thick, "axial")[0] is not None
    assert axial_reslice(volume("coronal", 20, 4.0))[0] is None  # 80 mm of a 240 mm field: a slab
    assert axial_reslice(volume("sagittal", 40, 4.0), "acquired") == (None, "sagittal slices as acquired (synthesis_plane acquired)")
    uneven = volume("sagittal", 40, 4.0)
    uneven = replace(uneven, positions=uneven.positions + np.outer(np.arange(40) % 2, uneven.normal) * 1.5)
    assert axial_reslice(uneven, "axial")[0] is None
    with pytest.raises(ValueError, match="plane must be one of auto, axial, acquired"):
        axial_reslice(thick, "coronal")


def test_a_tilted_series_grown_by_a_late_slice_keeps_its_transverse_slices_where_they_were():
    """A tilted series' sCT resampled onto transverse slices (``ct_plane = axial``): a late slice
    that grows the series adds transverse slices and moves none, so the slices already in the PACS
    keep their positions and UIDs (which follow the position). Until 2026-12-05 the grid started at
    the series' corner, and a slice added below it moved every transverse slice by a fraction of
    a slice: the sCT was replaced whole, under new UIDs."""
    tilt = np.deg2rad(20)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(np.sin(tilt)))
    normal = np.cross(orientation[:3], orientation[3:])
    corner = np.array([-117.3, -101.7, -40.2])

    def tilted(first: int, count: int) -> Volume:
        positions = np.array([corner + k * 5.0 * normal for k in range(first, first + count)])
        return Volume(voxels=np.zeros((count, 40, 48), np.float32), pixel_spacing=(5.0, 5.0), orientation=orientation,
                      positions=positions, frame_of_reference_uid="1.2.3")

    before = transverse_grid(tilted(0, 12))
    for grown in (tilted(-1, 13), tilted(0, 13)):  # a late slice below the others, or above them
        after = transverse_grid(grown)
        assert after.orientation == before.orientation and after.pixel_spacing == before.pixel_spacing
        assert len(after.positions) >= len(before.positions)
        z_before, z_after = np.round(before.positions[:, 2], 6), np.round(after.positions[:, 2], 6)
        assert set(z_before) <= set(z_after), "a transverse slice moved"
        offset = (before.positions[0, :2] - after.positions[0, :2]) / 5.0  # the same pixel lattice in plane
        np.testing.assert_allclose(offset, np.round(offset), atol=1e-6)
        assert (offset >= -1e-6).all()


@pytest.mark.parametrize("position", sorted(SCANNER_TRANSVERSE))
def test_transverse_slices_are_turned_to_the_orientation_a_ct_scanner_writes_for_the_patient_position(position):
    """A planning system may expect a prone or feet-first patient's CT in the orientation a CT
    scanner writes for that position (rows along the equipment's X axis, columns towards the
    floor: -1\\0\\0\\0\\-1\\0 head first prone, 0\\1\\0\\-1\\0\\0 head first decubitus right). The
    transverse sCT is turned so by an exchange of axes and flips: every voxel at the same point
    in patient space (sampled there: no interpolation), its slices one after another along the
    new normal, and turned back it is the volume it was."""
    expected = {"HFS": (1, 0, 0, 0, 1, 0), "HFP": (-1, 0, 0, 0, -1, 0), "FFS": (-1, 0, 0, 0, 1, 0), "FFP": (1, 0, 0, 0, -1, 0),
                "HFDR": (0, 1, 0, -1, 0, 0), "HFDL": (0, -1, 0, 1, 0, 0), "FFDR": (0, -1, 0, -1, 0, 0), "FFDL": (0, 1, 0, 1, 0, 0)}
    assert scanner_transverse(position) == scanner_transverse(f" {position.lower()} ") == tuple(float(v) for v in expected[position])
    row, col = np.array(expected[position][:3]), np.array(expected[position][3:])
    assert abs(np.cross(row, col)[2]) == 1  # transverse slices in every position
    head = _grid_volume(phantoms.oriented_grid("axial", 9, 20, 14, 4.0, 5.0))  # 9 slices, 20 rows, 14 columns: no axis alike
    head = replace(head, voxels=head.voxels + np.arange(head.voxels.size, dtype=np.float32).reshape(head.voxels.shape) / 1e3)
    assert head.orientation == TRANSVERSE
    turned = reoriented(head, scanner_transverse(position))
    assert turned.orientation == tuple(float(v) for v in expected[position])
    assert sorted(turned.voxels.shape) == sorted(head.voxels.shape) and turned.voxels.shape[0] == 9
    gaps = np.diff(turned.positions @ turned.normal)
    np.testing.assert_allclose(gaps, 5.0)  # one after another along its normal, the slice spacing kept
    sampled = resample(head, turned)
    assert not np.isnan(sampled).any()
    np.testing.assert_allclose(sampled, turned.voxels, atol=1e-3)  # each voxel where it was
    back = reoriented(turned, TRANSVERSE)
    assert (back.voxels == head.voxels).all()
    np.testing.assert_allclose(back.positions, head.positions, atol=1e-9)


def test_an_unknown_or_missing_patient_position_gets_head_first_supine_slices():
    assert scanner_transverse("") == scanner_transverse(None) == scanner_transverse("SEMIERECT") == TRANSVERSE
    head = _grid_volume(phantoms.oriented_grid("axial", 4, 10, 12, 4.0, 4.0))
    assert reoriented(head, TRANSVERSE) is head
    with pytest.raises(ValueError, match="is not an exchange of the axes"):
        reoriented(head, (1.0, 0.0, 0.0, 0.0, 0.8, 0.6))  # tilted slices of it: not without resampling
