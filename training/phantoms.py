"""Synthetic head phantoms: one random anatomy rendered as T1-weighted MR and as CT.

Nothing is downloaded: the demo, the tests and the shipped model all use these.
The anatomy is a perturbed ellipsoid with nested layers (skin, fat, outer
cortical bone, cancellous diploe, inner cortical bone, CSF, grey and white
matter), two ventricles and a frontal sinus with a bony wall.

``GENERATOR_VERSION`` goes into every model card trained on this data; bump it
whenever the rendered images change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from synthesis.volume import Volume

GENERATOR_VERSION = "phantom-head-1"

# Tissue labels.
AIR, SKIN, FAT, CORTICAL, CANCELLOUS, CSF, GREY, WHITE = range(8)
TISSUE_NAMES = ["air", "skin", "fat", "cortical bone", "cancellous bone", "csf", "grey matter", "white matter"]

# T1-weighted relative signal per tissue (fat bright, bone and air dark).
T1_SIGNAL = np.array([0.0, 0.50, 0.95, 0.04, 0.55, 0.15, 0.42, 0.62])
# CT attenuation per tissue in HU.
CT_HU = np.array([-1000.0, 30.0, -100.0, 1500.0, 450.0, 10.0, 40.0, 25.0])


@dataclass(frozen=True)
class Grid:
    """Sampling grid in patient coordinates (LPS, mm): a stack of planes of any orientation.

    ``row_cosine`` is the direction along a row (increasing column index),
    ``column_cosine`` the direction down a column, as in ImageOrientationPatient;
    slice ``k`` lies at ``centre + slice_offsets[k] * normal``.
    """

    rows: int
    columns: int
    pixel_spacing: float
    slice_offsets: tuple[float, ...]
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.column_cosine)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient (centre of the first pixel) of slice ``k``."""
        return (
            np.asarray(self.centre)
            + self.slice_offsets[k] * self.normal
            - (self.columns - 1) / 2.0 * self.pixel_spacing * np.asarray(self.row_cosine)
            - (self.rows - 1) / 2.0 * self.pixel_spacing * np.asarray(self.column_cosine)
        )

    def coordinates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) patient coordinates of every voxel, each shaped (slices, rows, columns)."""
        k = np.asarray(self.slice_offsets, dtype=np.float64)[:, None, None]
        i = ((np.arange(self.rows) - (self.rows - 1) / 2.0) * self.pixel_spacing)[None, :, None]
        j = ((np.arange(self.columns) - (self.columns - 1) / 2.0) * self.pixel_spacing)[None, None, :]
        axes = []
        for axis in range(3):
            axes.append(self.centre[axis] + k * self.normal[axis] + i * self.column_cosine[axis] + j * self.row_cosine[axis])
        x, y, z = (np.broadcast_to(a, (len(self.slice_offsets), self.rows, self.columns)) for a in axes)
        return z, y, x

    @property
    def orientation(self) -> list[float]:
        return [*self.row_cosine, *self.column_cosine]

    def volume(self, voxels: np.ndarray, frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Volume:
        """``voxels`` (slices, rows, columns) on this grid as the volume ``assemble`` would make of
        its DICOM series, without writing one."""
        positions = np.array([self.position(k) for k in range(len(self.slice_offsets))])
        return Volume(voxels.astype(np.float32), (self.pixel_spacing, self.pixel_spacing), tuple(self.orientation),  # type: ignore[arg-type]
                      positions, frame_of_reference_uid)


def axial_grid(slices: int, size: int, pixel_spacing: float, slice_spacing: float, z_centre: float = 0.0) -> Grid:
    z0 = z_centre - (slices - 1) / 2.0 * slice_spacing
    return Grid(rows=size, columns=size, pixel_spacing=pixel_spacing, slice_offsets=tuple(z0 + i * slice_spacing for i in range(slices)))


def oriented_grid(
    orientation: str, slices: int, rows: int, columns: int, pixel_spacing: float, slice_spacing: float
) -> Grid:
    """``axial``, ``sagittal``, ``coronal`` or ``oblique`` (axial tilted 20 degrees about x, 10 about z)."""
    offsets = tuple((i - (slices - 1) / 2.0) * slice_spacing for i in range(slices))
    if orientation == "axial":
        row, col = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    elif orientation == "sagittal":
        row, col = (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
    elif orientation == "coronal":
        row, col = (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
    elif orientation == "oblique":
        a, b = np.deg2rad(20.0), np.deg2rad(10.0)
        rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        r = rz @ rx
        row, col = tuple(float(v) for v in r[:, 0]), tuple(float(v) for v in r[:, 1])
    else:
        raise ValueError(f"orientation must be axial, sagittal, coronal or oblique, got {orientation!r}")
    return Grid(rows=rows, columns=columns, pixel_spacing=pixel_spacing, slice_offsets=offsets, row_cosine=row, column_cosine=col)  # type: ignore[arg-type]


def head_labels(seed: int, grid: Grid) -> np.ndarray:
    """Label volume (z, y, x) of one random head."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = grid.coordinates()
    a, b, c = rng.uniform(68, 80), rng.uniform(86, 100), rng.uniform(95, 110)
    cx, cy, cz = rng.normal(0, 3), rng.normal(0, 3), rng.normal(0, 4)
    x, y, z = xx - cx, yy - cy, zz - cz
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    # The surface lies at rho = modulation, which stays within 1 +- 0.13: a voxel with rho >= 1.2 is
    # air. The layers, sulci and their trigonometry are computed on the voxels inside that bound
    # alone (the same values, voxel for voxel, as over the whole grid: ~1.8x faster).
    near = rho < 1.2
    theta = np.arctan2(y[near], x[near])
    phi = np.clip(z[near] / c, -1, 1)
    modulation = np.ones_like(theta)
    taper = 1 - 0.5 * phi**2
    for k in range(2, 6):
        modulation += rng.uniform(0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) * taper
    modulation += rng.uniform(-0.03, 0.03) * phi
    depth = np.full(rho.shape, -1.0)  # approx. mm below the skin surface (negative: outside)
    depth[near] = (1.0 - rho[near] / modulation) * (a + b + c) / 3.0
    inside = depth[near]

    thickness = {
        SKIN: rng.uniform(1.5, 3.0),
        FAT: rng.uniform(2.0, 4.5),
        "outer": rng.uniform(1.5, 3.0),
        CANCELLOUS: rng.uniform(2.0, 4.5),
        "inner": rng.uniform(1.5, 2.5),
        CSF: rng.uniform(1.5, 3.5),
        GREY: rng.uniform(2.5, 4.5),
    }
    layers = np.full(inside.shape, WHITE, dtype=np.uint8)
    edges = np.cumsum([thickness[k] for k in (SKIN, FAT, "outer", CANCELLOUS, "inner", CSF, GREY)])
    layer_labels = [SKIN, FAT, CORTICAL, CANCELLOUS, CORTICAL, CSF, GREY]
    for edge, label in zip(edges[::-1], layer_labels[::-1]):
        layers[inside < edge] = label
    layers[inside < 0] = AIR

    # Sulci: CSF fingers into the grey matter.
    cortex = (layers >= GREY) & (inside < edges[-1] + 1.0)
    sulci = np.sin(theta[cortex] * rng.integers(9, 15) + rng.uniform(0, 6)) * np.sin(phi[cortex] * rng.integers(6, 10) * np.pi)
    layers[np.flatnonzero(cortex)[sulci > 0.85]] = CSF
    labels = np.full(rho.shape, AIR, dtype=np.uint8)
    labels[near] = layers

    # Ventricles.
    for side in (-1, 1):
        vx, vy, vz = side * rng.uniform(6, 10), rng.uniform(-5, 10), rng.uniform(0, 20)
        ax, ay, az = rng.uniform(4, 7), rng.uniform(15, 25), rng.uniform(8, 14)
        labels[((x - vx) / ax) ** 2 + ((y - vy) / ay) ** 2 + ((z - vz) / az) ** 2 < 1] = CSF

    # Frontal sinus: air pocket with a bony wall, low and anterior (-y is anterior in LPS).
    sx, sy, sz = rng.normal(0, 2), -(b - rng.uniform(22, 28)), -c * rng.uniform(0.35, 0.5)
    sa, sb, sc = rng.uniform(10, 18), rng.uniform(7, 11), rng.uniform(9, 14)
    sinus_r = np.sqrt(((x - sx) / sa) ** 2 + ((y - sy) / sb) ** 2 + ((z - sz) / sc) ** 2)
    wall = 1.0 + 2.5 / min(sa, sb, sc)
    labels[(sinus_r < wall) & (depth > 0)] = CORTICAL
    labels[sinus_r < 1.0] = AIR
    return labels


def _smooth(volume: np.ndarray, sigma_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(volume, sigma=(0, sigma_px, sigma_px))


def render_mr(labels: np.ndarray, grid: Grid, seed: int) -> np.ndarray:
    """T1-weighted magnitude image (float, ~0..1): tissue contrast, partial volume, bias field, Rician noise."""
    rng = np.random.default_rng(seed + 7_919)
    signal = T1_SIGNAL * rng.uniform(0.93, 1.07, size=T1_SIGNAL.shape)
    signal[AIR] = 0.0
    image = _smooth(signal[labels], 0.6 / min(grid.pixel_spacing, 1.0))
    zz, yy, xx = grid.coordinates()
    u, v, w = xx / 128.0, yy / 128.0, zz / 128.0
    bias = 1.0 + rng.uniform(-0.12, 0.12) * u + rng.uniform(-0.12, 0.12) * v + rng.uniform(-0.08, 0.08) * w
    bias += rng.uniform(-0.08, 0.08) * (u * u + v * v)
    image = image * bias
    sigma = rng.uniform(0.012, 0.025)
    image = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return image.astype(np.float32)


def render_ct(labels: np.ndarray, grid: Grid, seed: int) -> np.ndarray:
    """CT in HU: tissue densities with per-subject variation, slight blur and noise."""
    rng = np.random.default_rng(seed + 104_729)
    hu = CT_HU + rng.normal(0, 1, size=CT_HU.shape) * np.array([0, 8, 10, 120, 60, 3, 4, 4])
    image = _smooth(hu[labels], 0.5 / min(grid.pixel_spacing, 1.0))
    image = image + rng.normal(0, rng.uniform(6, 14), image.shape)
    return np.clip(image, -1024, 3071).astype(np.float32)


def mr_to_stored(mr: np.ndarray) -> np.ndarray:
    """MR float image to the uint16 values written in DICOM (12-bit range)."""
    return np.clip(np.rint(mr * 3000.0), 0, 4095).astype(np.uint16)
