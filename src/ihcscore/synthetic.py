"""Synthetic H-DAB regions and slides whose per-cell truth is known.

The generator works in two steps so that one truth can be rendered many ways:

1. **Layout** (:func:`make_synthetic_layout`): nuclei of three cell types are
   placed without overlap inside a smooth random tissue mask (tumour cells in
   nests, stroma in streams around them, lymphocytes mostly in the stroma).
   Each nucleus is expanded by ``cell_expansion_um`` without overlap (nearest
   nucleus wins, as detection does); cytoplasm and the membrane ring follow the
   scoring contract's definitions. Every cell gets a true DAB bin and an OD
   level inside that bin, at least ``dab_margin_od`` from every threshold, and
   the level is painted uniformly on the compartment(s) ``dab_location`` names.
   The result is a hematoxylin and a DAB OD map plus label images and a truth
   table.
2. **Rendering** (:func:`render_layout`): Beer-Lambert,
   ``OD = h * H_vec + d * DAB_vec (+ residual noise)``, light optical blur,
   ``I = I0 * 10**-OD`` with the chosen background ``I0``, an optional scanner
   gamma and sensor noise. Other stain vectors, backgrounds, gamma or faded
   hematoxylin re-render the *same* truth.

The random streams of the layout and of the rendering are separate, so the same
``seed`` gives the same cells whatever the rendering parameters are.

Large slides (:func:`write_large_synthetic_slide`) are generated block by
block with deterministic per-block seeds; nuclei never cross block borders and
each block is rendered with a halo holding its neighbours' nuclei, so cells
that straddle a border are identical on both sides.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.special import ndtri
from skimage import segmentation

from .stains import H_DAB_DEFAULT, StainVectors

__all__ = [
    "CELL_TYPES",
    "COMPARTMENTS",
    "DAB_LOCATIONS",
    "SyntheticLayout",
    "make_synthetic_layout",
    "render_layout",
    "render_with_other_scanner",
    "make_synthetic_region",
    "truth_scores",
    "make_synthetic_slide",
    "write_large_synthetic_slide",
]

CELL_TYPES = ("tumour", "lymphocyte", "stroma")
DAB_LOCATIONS = ("cell", "membrane", "cytoplasm", "nucleus")
COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")

#: Cells per mm² of region used when a count is not given.
DEFAULT_DENSITY_PER_MM2 = {"tumour": 1500.0, "lymphocyte": 450.0, "stroma": 300.0}

#: Probability of the true bins 0, 1+, 2+, 3+ per cell type. With fewer
#: thresholds the upper bins merge into the last one.
DEFAULT_BIN_PROBABILITIES = {
    "tumour": (0.35, 0.25, 0.25, 0.15),
    "lymphocyte": (0.0, 0.05, 0.15, 0.80),
    "stroma": (1.0, 0.0, 0.0, 0.0),
}

# Nucleus shapes (semi-axes in µm) and hematoxylin OD per cell type.
_NUCLEUS = {
    "tumour": dict(semi_major_um=(4.5, 6.0), aspect=(0.70, 0.90), hematoxylin_od=(0.35, 0.60), texture=0.25),
    "lymphocyte": dict(semi_major_um=(2.5, 3.0), aspect=(0.88, 1.00), hematoxylin_od=(0.70, 0.90), texture=0.08),
    "stroma": dict(semi_major_um=(6.0, 8.5), aspect=(0.17, 0.25), hematoxylin_od=(0.40, 0.60), texture=0.15),
}
_MAX_SEMI_MAJOR_UM = max(v["semi_major_um"][1] for v in _NUCLEUS.values())
_NUCLEUS_GAP_UM = 1.5  # minimum distance between the bounding circles of two nuclei
_HAZE_OD = 0.05  # faint hematoxylin counterstain of cytoplasm and extracellular matrix
_TOP_BIN_SPAN_OD = 0.45  # the highest bin's levels lie in [t_last + margin, t_last + span]


# ---------------------------------------------------------------------------
# Deterministic random fields in global (slide) coordinates
# ---------------------------------------------------------------------------

class _WaveField:
    """Sum of random plane waves: a smooth unit-variance field over the plane (µm)."""

    def __init__(self, rng, n_waves, wavelength_um):
        lam = rng.uniform(*wavelength_um, n_waves)
        ang = rng.uniform(0, 2 * np.pi, n_waves)
        k = 2 * np.pi / lam
        self.kx, self.ky = k * np.cos(ang), k * np.sin(ang)
        self.phase = rng.uniform(0, 2 * np.pi, n_waves)
        self.amp = np.sqrt(2.0 / n_waves)

    def _arg(self, x_um, y_um):
        x = np.asarray(x_um, dtype=np.float64)[..., None]
        y = np.asarray(y_um, dtype=np.float64)[..., None]
        return self.kx * x + self.ky * y + self.phase

    def __call__(self, x_um, y_um):
        return self.amp * np.cos(self._arg(x_um, y_um)).sum(-1)

    def gradient(self, x_um, y_um):
        s = -self.amp * np.sin(self._arg(x_um, y_um))
        return (s * self.kx).sum(-1), (s * self.ky).sum(-1)


def _lattice_interp(fn, x0, y0, h, w, step):
    """Evaluate ``fn(node_y_px, node_x_px)`` on the global lattice of multiples
    of ``step`` px around a canvas and interpolate bilinearly to its pixels.

    Nodes sit at global coordinates, so neighbouring canvases agree exactly.
    """
    ix0, iy0 = x0 // step, y0 // step
    nx = (x0 + w - 1) // step - ix0 + 2
    ny = (y0 + h - 1) // step - iy0 + 2
    nodes_x = (np.arange(nx) + ix0) * step
    nodes_y = (np.arange(ny) + iy0) * step
    g = np.asarray(fn(nodes_y[:, None], nodes_x[None, :]), dtype=np.float32)
    fx = (np.arange(x0, x0 + w) - ix0 * step) / step
    jx = np.floor(fx).astype(np.intp)
    tx = (fx - jx).astype(np.float32)
    a = g[:, jx] * (1 - tx) + g[:, jx + 1] * tx
    fy = (np.arange(y0, y0 + h) - iy0 * step) / step
    jy = np.floor(fy).astype(np.intp)
    ty = (fy - jy).astype(np.float32)[:, None]
    return a[jy] * (1 - ty) + a[jy + 1] * ty


def _hash_uniform(iy, ix, key):
    """Uniform [0, 1) noise that is a pure function of integer pixel coordinates."""
    with np.errstate(over="ignore"):
        z = (np.asarray(iy, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.asarray(ix, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        z = z ^ np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _texture(x0, y0, h, w, key, step=2):
    """Roughly unit-variance, ~1 µm grained noise on a canvas (global coordinates)."""
    # Uniform noise has sd 1/sqrt(12); bilinear interpolation with step 2 keeps ~0.75 of it.
    return _lattice_interp(lambda yy, xx: (_hash_uniform(yy, xx, key) - 0.5) * (np.sqrt(12.0) / 0.75),
                           x0, y0, h, w, step)


@dataclass(frozen=True)
class _Fields:
    tissue: _WaveField
    nests: _WaveField
    tissue_cut: float
    nest_cut: float
    texture_key: int
    haze_key: int

    @classmethod
    def from_seed(cls, seed, tissue_fraction, nest_fraction):
        rng = np.random.default_rng([int(seed), 7])
        return cls(
            tissue=_WaveField(rng, 12, (700.0, 2500.0)),
            nests=_WaveField(rng, 12, (150.0, 450.0)),
            tissue_cut=_cut(tissue_fraction),
            nest_cut=_cut(nest_fraction),
            texture_key=int(rng.integers(1, 2**62)),
            haze_key=int(rng.integers(1, 2**62)),
        )

    def tissue_at(self, x_um, y_um):
        return self.tissue(x_um, y_um) > self.tissue_cut

    def nest_at(self, x_um, y_um):
        return self.nests(x_um, y_um) > self.nest_cut


def _cut(fraction):
    # The wave fields are close to standard normal: the level exceeded by `fraction`.
    if fraction >= 1:
        return -np.inf
    if fraction <= 0:
        return np.inf
    return float(ndtri(1.0 - fraction))


# ---------------------------------------------------------------------------
# Cell placement
# ---------------------------------------------------------------------------

def _bin_levels(thresholds, margin_od):
    t = [float(x) for x in thresholds]
    if not t or any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError(f"thresholds must be 1-3 increasing OD values, got {thresholds}")
    if len(t) > 3:
        raise ValueError(f"at most 3 thresholds, got {len(t)}")
    edges = [0.0] + t + [t[-1] + _TOP_BIN_SPAN_OD]
    lo = [edges[0]] + [e + margin_od for e in edges[1:-1]]
    hi = [e - margin_od for e in edges[1:-1]] + [edges[-1]]
    if any(h <= l for l, h in zip(lo, hi)):
        raise ValueError(f"thresholds {t} are closer than 2 x dab_margin_od ({margin_od}) to each other or to 0")
    return np.array(lo), np.array(hi)


def _bin_probabilities(probs, n_bins):
    p = np.asarray(probs, dtype=np.float64).ravel()
    if p.size != 4 or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"bin probabilities must be 4 non-negative numbers (0, 1+, 2+, 3+), got {probs}")
    p = np.concatenate([p[: n_bins - 1], [p[n_bins - 1:].sum()]])
    return p / p.sum()


def _place_cells(rng, fields, x0, y0, h, w, mpp, counts, bin_probs, thresholds, margin_od):
    """Place nuclei in the block ``[x0, x0+w) x [y0, y0+h)`` (global px).

    Every nucleus's bounding circle stays ``_NUCLEUS_GAP_UM / 2`` inside the
    block, so blocks placed independently never produce overlapping nuclei.
    Returns a dict of arrays, one entry per cell.
    """
    gap = _NUCLEUS_GAP_UM / mpp
    grid = 2 * _MAX_SEMI_MAJOR_UM / mpp + gap
    buckets: dict[tuple[int, int], list[int]] = {}
    px, py, pr = [], [], []
    out = {k: [] for k in ("type", "x", "y", "a", "b", "theta", "h_od", "texture")}
    lo, hi = _bin_levels(thresholds, margin_od)
    n_bins = len(lo)

    for code, ctype in enumerate(CELL_TYPES):
        n_target = int(counts.get(ctype, 0))
        if n_target <= 0:
            continue
        spec = _NUCLEUS[ctype]
        placed = 0
        tried = 0
        max_tries = 30 * n_target + 200
        while placed < n_target and tried < max_tries:
            m = max(64, 2 * (n_target - placed))
            tried += m
            a = rng.uniform(*spec["semi_major_um"], m) / mpp
            b = a * rng.uniform(*spec["aspect"], m)
            edge = a + gap / 2
            x = x0 + edge + rng.random(m) * np.maximum(w - 1 - 2 * edge, 0)
            y = y0 + edge + rng.random(m) * np.maximum(h - 1 - 2 * edge, 0)
            u = rng.random(m)
            hod = rng.uniform(*spec["hematoxylin_od"], m)
            jitter = rng.normal(0, 0.3, m)
            theta = rng.uniform(0, np.pi, m)
            xu, yu = x * mpp, y * mpp
            tissue = fields.tissue_at(xu, yu)
            nest = fields.nest_at(xu, yu)
            if ctype == "tumour":
                p = tissue & nest
            elif ctype == "stroma":
                p = tissue & ~nest
                gx, gy = fields.nests.gradient(xu, yu)
                # Stroma runs along the nest borders: perpendicular to the gradient.
                theta = np.arctan2(gy, gx) + np.pi / 2 + jitter
            else:
                p = np.where(tissue, np.where(nest, 0.2, 1.0), 0.0)
            ok = u < p
            for i in np.flatnonzero(ok):
                xi, yi, ri = x[i], y[i], a[i]
                gx_, gy_ = int(xi // grid), int(yi // grid)
                clash = False
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        for j in buckets.get((gx_ + dx, gy_ + dy), ()):
                            lim = ri + pr[j] + gap
                            if (xi - px[j]) ** 2 + (yi - py[j]) ** 2 < lim * lim:
                                clash = True
                                break
                        if clash:
                            break
                    if clash:
                        break
                if clash:
                    continue
                buckets.setdefault((gx_, gy_), []).append(len(px))
                px.append(xi), py.append(yi), pr.append(ri)
                out["type"].append(code)
                out["x"].append(xi), out["y"].append(yi)
                out["a"].append(ri), out["b"].append(b[i])
                out["theta"].append(theta[i]), out["h_od"].append(hod[i])
                out["texture"].append(spec["texture"])
                placed += 1
                if placed >= n_target:
                    break

    cells = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
    cells["type"] = cells["type"].astype(np.int8)
    n = len(cells["type"])
    bins = np.zeros(n, dtype=np.int8)
    u = rng.random(n)
    for code, ctype in enumerate(CELL_TYPES):
        sel = cells["type"] == code
        cdf = np.cumsum(bin_probs[ctype])
        bins[sel] = np.minimum(np.searchsorted(cdf, u[sel], side="right"), n_bins - 1)
    cells["bin"] = bins
    cells["dab_od"] = lo[bins] + rng.random(n) * (hi[bins] - lo[bins])
    return cells


# ---------------------------------------------------------------------------
# Rasterising a canvas
# ---------------------------------------------------------------------------

def _rasterize_nuclei(cells, x0, y0, h, w):
    """Label image of the cells' nuclei on the canvas; label i+1 = cell i."""
    nuclei = np.zeros((h, w), dtype=np.int32)
    cx, cy = cells["x"] - x0, cells["y"] - y0
    a, b, th = cells["a"], cells["b"], cells["theta"]
    ct, st = np.cos(th), np.sin(th)
    r = np.ceil(a).astype(int) + 1
    ylo = np.maximum(np.floor(cy).astype(int) - r, 0)
    yhi = np.minimum(np.floor(cy).astype(int) + r + 1, h)
    xlo = np.maximum(np.floor(cx).astype(int) - r, 0)
    xhi = np.minimum(np.floor(cx).astype(int) + r + 1, w)
    for i in np.flatnonzero((yhi > ylo) & (xhi > xlo)):
        dy = np.arange(ylo[i], yhi[i])[:, None] - cy[i]
        dx = np.arange(xlo[i], xhi[i])[None, :] - cx[i]
        u = (dx * ct[i] + dy * st[i]) / a[i]
        v = (dy * ct[i] - dx * st[i]) / b[i]
        inside = u * u + v * v <= 1.0
        view = nuclei[ylo[i]:yhi[i], xlo[i]:xhi[i]]
        view[inside] = i + 1
    return nuclei


def _compartments(nuclei, cells_lab, membrane_width_px):
    """Cytoplasm and membrane label images (the contract's definitions)."""
    cytoplasm = np.where(nuclei > 0, 0, cells_lab).astype(np.int32)
    boundary = segmentation.find_boundaries(cells_lab, mode="inner")
    # distance to the nearest boundary pixel < width  <=>  a boundary pixel
    # lies in the open disk of that radius: a dilation, cheaper than an EDT.
    r = int(np.ceil(membrane_width_px))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = yy * yy + xx * xx < membrane_width_px ** 2
    ring = ndi.binary_dilation(boundary, structure=disk) if disk.any() else np.zeros_like(boundary)
    membrane = np.where(ring & (cells_lab > 0), cells_lab, 0).astype(np.int32)
    return cytoplasm, membrane


def _paint_canvas(cells, fields, x0, y0, h, w, mpp, dab_location, cell_expansion_um, membrane_width_um):
    """Unblurred hematoxylin and DAB OD maps plus label images of one canvas."""
    nuclei = _rasterize_nuclei(cells, x0, y0, h, w)
    cells_lab = segmentation.expand_labels(nuclei, distance=cell_expansion_um / mpp) \
        if cell_expansion_um > 0 else nuclei.copy()
    cytoplasm, membrane = _compartments(nuclei, cells_lab, membrane_width_um / mpp)
    tissue = _lattice_interp(lambda yy, xx: fields.tissue(xx * mpp, yy * mpp), x0, y0, h, w, 8) > fields.tissue_cut

    n = len(cells["type"])
    h_lvl = np.concatenate([[0.0], cells["h_od"]]).astype(np.float32)
    amp = np.concatenate([[0.0], cells["texture"]]).astype(np.float32)
    d_lvl = np.concatenate([[0.0], cells["dab_od"]]).astype(np.float32)

    haze_tex = _texture(x0, y0, h, w, fields.haze_key, step=6)
    hem = np.where(tissue | (cells_lab > 0), np.float32(_HAZE_OD) * (1 + 0.3 * haze_tex), 0).astype(np.float32)
    nuc = nuclei > 0
    tex = _texture(x0, y0, h, w, fields.texture_key)
    hem[nuc] = h_lvl[nuclei[nuc]] * (1 + amp[nuclei[nuc]] * tex[nuc])
    np.maximum(hem, 0, out=hem)

    lab = {"cell": cells_lab, "membrane": membrane, "cytoplasm": cytoplasm, "nucleus": nuclei}[dab_location]
    dab = d_lvl[lab]
    labels = {"nuclei": nuclei, "cells": cells_lab, "cytoplasm": cytoplasm, "membrane": membrane,
              "tissue": tissue}
    assert n + 1 == len(d_lvl)
    return hem, dab, labels


def _cell_table(cells, labels, dab, mpp, x0, y0, label_offset=0):
    """Truth rows for the cells whose nucleus is on the canvas."""
    nuclei = labels["nuclei"]
    n = len(cells["type"])
    flat = nuclei.ravel()
    idx = np.flatnonzero(flat)
    lab = flat[idx]
    count = np.bincount(lab, minlength=n + 1)[1:]
    sx = np.bincount(lab, weights=idx % nuclei.shape[1], minlength=n + 1)[1:]
    sy = np.bincount(lab, weights=idx // nuclei.shape[1], minlength=n + 1)[1:]
    keep = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        table = {
            "label": np.arange(1, n + 1) + label_offset,
            # pixel k spans [k, k + 1), as the engine's (QuPath's) centroids
            "x_px": sx / count + x0 + 0.5,
            "y_px": sy / count + y0 + 0.5,
            "cell_type": np.asarray(CELL_TYPES, dtype=object)[cells["type"]],
        }
        table["class"] = np.where(cells["type"] == 0, "tumour", "other").astype(object)
        table["dab_od"] = cells["dab_od"]
        table["bin"] = cells["bin"].astype(np.int8)
        table["nucleus_area_um2"] = count * mpp * mpp
        table["hematoxylin_od"] = cells["h_od"]
        table["nucleus_major_um"] = 2 * cells["a"] * mpp
        table["nucleus_minor_um"] = 2 * cells["b"] * mpp
        # True mean DAB of the painted map over each compartment (before blur/noise).
        for name, key in (("nucleus", "nuclei"), ("cytoplasm", "cytoplasm"), ("membrane", "membrane"),
                          ("cell", "cells")):
            lab = labels[key].ravel()
            nz = np.flatnonzero(lab)
            c = np.bincount(lab[nz], minlength=n + 1)[1:]
            s = np.bincount(lab[nz], weights=dab.ravel()[nz], minlength=n + 1)[1:]
            table[f"dab_od_{name}"] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    df = pd.DataFrame(table)
    return df[keep].reset_index(drop=True)


# ---------------------------------------------------------------------------
# Public API: layout and rendering
# ---------------------------------------------------------------------------

@dataclass
class SyntheticLayout:
    """The truth of a synthetic region, before rendering.

    Attributes
    ----------
    hematoxylin_od, dab_od : (H, W) float32 arrays
        Stain amounts per pixel (OD units), before blur and noise.
    labels : dict of (H, W) arrays
        ``nuclei``, ``cells``, ``cytoplasm``, ``membrane`` (int32; label ``k`` is
        truth row ``k - 1``) and ``tissue`` (bool).
    truth : DataFrame
        One row per cell; see :func:`make_synthetic_region`.
    mpp : float
        Pixel size in µm/px.
    params : dict
        Generator parameters (JSON-serialisable).
    """

    hematoxylin_od: np.ndarray
    dab_od: np.ndarray
    labels: dict
    truth: pd.DataFrame
    mpp: float
    params: dict = field(default_factory=dict)


def _counts(shape, mpp, n_tumour, n_lymphocytes, n_stroma, density_per_mm2=None):
    dens = dict(DEFAULT_DENSITY_PER_MM2, **(density_per_mm2 or {}))
    area_mm2 = shape[0] * shape[1] * (mpp / 1000.0) ** 2
    given = {"tumour": n_tumour, "lymphocyte": n_lymphocytes, "stroma": n_stroma}
    return {k: int(round(dens[k] * area_mm2)) if v is None else int(v) for k, v in given.items()}


def _check_common(shape, mpp, dab_location):
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"shape must be (H, W) with both sides >= 16 px, got {shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0 µm/px, got {mpp}")
    if dab_location not in DAB_LOCATIONS:
        raise ValueError(f"dab_location must be one of {DAB_LOCATIONS}, got {dab_location!r}")


def make_synthetic_layout(
    shape=(1024, 1024),
    mpp=0.5,
    seed=0,
    *,
    n_tumour=None,
    n_lymphocytes=None,
    n_stroma=None,
    dab_location="cell",
    cell_expansion_um=5.0,
    membrane_width_um=1.0,
    thresholds=(0.2, 0.4, 0.6),
    bin_probabilities=None,
    dab_margin_od=0.05,
    tissue_fraction=0.85,
    nest_fraction=0.5,
) -> SyntheticLayout:
    """Place cells and paint their true stain amounts (no rendering).

    Parameters
    ----------
    shape : (int, int)
        Region size (H, W) in pixels.
    mpp : float
        Pixel size in µm/px.
    seed : int
        Seed of the layout (positions, shapes, bins, DAB levels, tissue mask).
    n_tumour, n_lymphocytes, n_stroma : int, optional
        Number of cells to place; by default from :data:`DEFAULT_DENSITY_PER_MM2`
        times the region area. Placement gives up after ``30 n`` candidates, so
        a crowded request places fewer (the truth table says how many).
    dab_location : {"cell", "membrane", "cytoplasm", "nucleus"}
        Compartment(s) painted with each cell's DAB level ("cell" = nucleus +
        cytoplasm).
    cell_expansion_um, membrane_width_um : float
        Cell = nucleus expanded by this distance without overlap; membrane = the
        ring of cell pixels closer than ``membrane_width_um`` to the boundary.
    thresholds : sequence of 1-3 float
        DAB OD bin thresholds the true bins refer to.
    bin_probabilities : dict, optional
        Per cell type, probabilities of the bins 0, 1+, 2+, 3+ (defaults:
        :data:`DEFAULT_BIN_PROBABILITIES`).
    dab_margin_od : float
        Minimum distance of every true DAB level from every threshold.
    tissue_fraction, nest_fraction : float
        Approximate fraction of the region covered by tissue, and of the tissue
        covered by tumour nests.

    Returns
    -------
    SyntheticLayout
    """
    shape = tuple(int(s) for s in shape)
    _check_common(shape, mpp, dab_location)
    probs = {k: tuple(v) for k, v in DEFAULT_BIN_PROBABILITIES.items()}
    probs.update({k: tuple(v) for k, v in (bin_probabilities or {}).items()})
    unknown = set(probs) - set(CELL_TYPES)
    if unknown:
        raise ValueError(f"bin_probabilities: unknown cell type(s) {sorted(unknown)}")
    n_bins = len(thresholds) + 1
    bin_probs = {k: _bin_probabilities(v, n_bins) for k, v in probs.items()}
    counts = _counts(shape, mpp, n_tumour, n_lymphocytes, n_stroma)
    fields = _Fields.from_seed(seed, tissue_fraction, nest_fraction)
    rng = np.random.default_rng([int(seed), 0, 0])
    h, w = shape
    cells = _place_cells(rng, fields, 0, 0, h, w, mpp, counts, bin_probs, thresholds, dab_margin_od)
    hem, dab, labels = _paint_canvas(cells, fields, 0, 0, h, w, mpp, dab_location,
                                     cell_expansion_um, membrane_width_um)
    truth = _cell_table(cells, labels, dab, mpp, 0, 0)
    params = dict(
        shape=list(shape), mpp=float(mpp), seed=int(seed), requested_counts=counts,
        dab_location=dab_location, cell_expansion_um=float(cell_expansion_um),
        membrane_width_um=float(membrane_width_um), thresholds=[float(t) for t in thresholds],
        bin_probabilities={k: list(map(float, v)) for k, v in probs.items()},
        dab_margin_od=float(dab_margin_od), tissue_fraction=float(tissue_fraction),
        nest_fraction=float(nest_fraction),
    )
    return SyntheticLayout(hematoxylin_od=hem, dab_od=dab, labels=labels, truth=truth, mpp=float(mpp),
                           params=params)


def _render(hem, dab, crop, rng, stains, background, hematoxylin_scale, gamma, noise_sd, residual_od_sd,
            blur_sigma_px):
    """Beer-Lambert rendering of (blurred) stain maps; ``crop`` = slices applied after the blur."""
    if blur_sigma_px > 0:
        hem = ndi.gaussian_filter(hem, blur_sigma_px, mode="nearest", truncate=3.0)
        dab = ndi.gaussian_filter(dab, blur_sigma_px, mode="nearest", truncate=3.0)
    hem, dab = hem[crop], dab[crop]
    bg = np.asarray(stains.background if background is None else background, dtype=np.float32).reshape(3)
    if np.any(bg <= 0) or np.any(bg > 255):
        raise ValueError(f"background RGB must be in (0, 255], got {tuple(bg)}")
    hv = np.asarray(stains.hematoxylin, dtype=np.float32)
    dv = np.asarray(stains.dab, dtype=np.float32)
    od = (hem * np.float32(hematoxylin_scale))[..., None] * hv + dab[..., None] * dv
    if residual_od_sd > 0:
        res = np.asarray(stains.residual, dtype=np.float32)
        od += rng.standard_normal(hem.shape, dtype=np.float32)[..., None] * np.float32(residual_od_sd) * res
    od *= np.float32(-np.log(10.0))
    inten = np.exp(od, out=od)
    inten *= bg
    if gamma is not None and gamma != 1:
        inten = 255.0 * np.power(np.clip(inten / 255.0, 0, 1), np.float32(gamma))
    if noise_sd > 0:
        inten += rng.standard_normal(inten.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.clip(np.rint(inten), 0, 255).astype(np.uint8)


def render_layout(
    layout: SyntheticLayout,
    *,
    stains: StainVectors = H_DAB_DEFAULT,
    background=None,
    hematoxylin_scale=1.0,
    gamma=None,
    noise_sd=1.5,
    residual_od_sd=0.01,
    blur_sigma_um=0.2,
    seed=0,
) -> np.ndarray:
    """Render a layout to 8-bit RGB (Beer-Lambert).

    Parameters
    ----------
    layout : SyntheticLayout
    stains : StainVectors
        Hematoxylin and DAB OD vectors of the simulated scanner/stain batch.
    background : sequence of 3 float, optional
        Glass RGB ``I0``; default ``stains.background``.
    hematoxylin_scale : float
        Multiplies every hematoxylin amount (< 1: faded counterstain).
    gamma : float, optional
        Scanner tone curve: ``I_out = 255 (I / 255) ** gamma`` after
        Beer-Lambert (< 1 brightens). None: linear.
    noise_sd : float
        Sensor noise, standard deviation in 8-bit intensity units.
    residual_od_sd : float
        Per-pixel OD noise along the residual (third) stain vector.
    blur_sigma_um : float
        Optical blur (Gaussian sigma, µm) applied to the stain maps. 0.2 µm is
        the point spread of a 20x/0.75 NA objective (FWHM ~0.45 µm); it keeps
        a 1 µm membrane ring within ~5 % of its painted level.
    seed : int
        Seed of the noise only.

    Returns
    -------
    (H, W, 3) uint8 array
    """
    rng = np.random.default_rng([int(seed), 1])
    return _render(layout.hematoxylin_od, layout.dab_od, (slice(None), slice(None)), rng, stains, background,
                   hematoxylin_scale, gamma, noise_sd, residual_od_sd, blur_sigma_um / layout.mpp)


def render_with_other_scanner(layout: SyntheticLayout, **render_kwargs) -> np.ndarray:
    """Re-render the same truth as another scanner/stain batch would.

    A thin wrapper of :func:`render_layout` (same keywords: ``stains``,
    ``background``, ``hematoxylin_scale``, ``gamma``, ``noise_sd``, ...), kept
    as a name for stain-robustness tests.
    """
    return render_layout(layout, **render_kwargs)


def make_synthetic_region(
    shape=(1024, 1024),
    mpp=0.5,
    seed=0,
    *,
    n_tumour=None,
    n_lymphocytes=None,
    n_stroma=None,
    dab_location="cell",
    stains: StainVectors = H_DAB_DEFAULT,
    background=None,
    hematoxylin_scale=1.0,
    gamma=None,
    noise_sd=1.5,
    cell_expansion_um=5.0,
    membrane_width_um=1.0,
    thresholds=(0.2, 0.4, 0.6),
    **kwargs,
):
    """A synthetic H-DAB region with its per-cell truth.

    Parameters are those of :func:`make_synthetic_layout` (layout) and
    :func:`render_layout` (rendering); further keywords (``bin_probabilities``,
    ``dab_margin_od``, ``tissue_fraction``, ``nest_fraction``, ``residual_od_sd``,
    ``blur_sigma_um``) go to whichever takes them. The same ``seed`` gives the
    same cells whatever the rendering parameters are.

    Returns
    -------
    rgb : (H, W, 3) uint8 array
    truth : DataFrame
        One row per cell: ``label`` (value in the label images), ``x_px``,
        ``y_px`` (nucleus centroid), ``cell_type`` (tumour / lymphocyte /
        stroma), ``class`` (tumour / other), ``dab_od`` (true level painted on
        ``dab_location``), ``bin`` (its bin under ``thresholds``),
        ``nucleus_area_um2``, ``hematoxylin_od``, ``nucleus_major_um``,
        ``nucleus_minor_um`` and ``dab_od_{nucleus,cytoplasm,membrane,cell}``
        (true mean DAB per compartment before blur and noise).
    labels : dict
        ``nuclei``, ``cells``, ``cytoplasm``, ``membrane`` (int32) and
        ``tissue`` (bool) images.
    """
    render_keys = {"residual_od_sd", "blur_sigma_um"}
    rkw = {k: kwargs.pop(k) for k in list(kwargs) if k in render_keys}
    layout = make_synthetic_layout(
        shape, mpp, seed, n_tumour=n_tumour, n_lymphocytes=n_lymphocytes, n_stroma=n_stroma,
        dab_location=dab_location, cell_expansion_um=cell_expansion_um, membrane_width_um=membrane_width_um,
        thresholds=thresholds, **kwargs)
    rgb = render_layout(layout, stains=stains, background=background, hematoxylin_scale=hematoxylin_scale,
                        gamma=gamma, noise_sd=noise_sd, seed=seed, **rkw)
    return rgb, layout.truth, layout.labels


# ---------------------------------------------------------------------------
# True scores
# ---------------------------------------------------------------------------

def _score(bins, n_thresholds):
    n = int(len(bins))
    counts = {f"n_{k}": int(np.sum(bins == k)) for k in range(4)}
    pos = n - counts["n_0"]
    h = None
    if n and n_thresholds >= 3:
        h = float((counts["n_1"] + 2 * counts["n_2"] + 3 * counts["n_3"]) / n * 100)
    return {"n": n, **counts, "h_score": h, "percent_positive": float(pos / n * 100) if n else None}


def truth_scores(truth: pd.DataFrame, thresholds=(0.2, 0.4, 0.6), compartment=None) -> dict:
    """True H-score and percent positive for tumour cells and for all cells.

    Bins are recomputed from the truth DAB levels with ``thresholds`` using the
    scoring contract: 0 ``< t1``, 1+ ``[t1, t2)``, 2+ ``[t2, t3)``, 3+ ``>= t3``;
    H-score = (n1 + 2 n2 + 3 n3) / n x 100 (null unless 3 thresholds), positive
    % = (n1 + n2 + n3) / n x 100 (null without cells).

    Parameters
    ----------
    truth : DataFrame
        A truth table (columns ``class`` and ``dab_od``).
    thresholds : sequence of float
    compartment : {"nucleus", "cytoplasm", "membrane", "cell"}, optional
        Score the true compartment mean (``dab_od_<compartment>``) instead of the
        painted level ``dab_od``. Only the painted compartment(s) keep the
        guaranteed margin from the thresholds.

    Returns
    -------
    dict
        ``{"tumour": {n, n_0..n_3, h_score, percent_positive}, "all": {...}}``.
    """
    col = "dab_od" if compartment is None else f"dab_od_{compartment}"
    values = truth[col].to_numpy(dtype=float)
    bins = np.searchsorted(np.asarray(thresholds, dtype=float), np.nan_to_num(values, nan=0.0), side="right")
    tumour = (truth["class"] == "tumour").to_numpy()
    return {"tumour": _score(bins[tumour], len(thresholds)), "all": _score(bins, len(thresholds))}


def _truth_json(truth, params, stains, background, render, slide_path):
    thresholds = params["thresholds"]
    scores = truth_scores(truth, thresholds)
    by_comp = {c: truth_scores(truth, thresholds, compartment=c) for c in COMPARTMENTS}
    for group in ("tumour", "all"):
        scores[group]["by_compartment"] = {c: by_comp[c][group] for c in COMPARTMENTS}
    bg = stains.background if background is None else tuple(float(x) for x in background)
    return {
        "slide": Path(slide_path).name,
        "generator": "ihcscore.synthetic",
        "seed": params["seed"],
        "mpp": params["mpp"],
        "shape": params["shape"],
        "scored_compartment": params["dab_location"],
        "thresholds": thresholds,
        "n_cells": int(len(truth)),
        "n_by_type": {t: int((truth["cell_type"] == t).sum()) for t in CELL_TYPES},
        "scores": scores,
        "stain_vectors": stains.to_dict(),
        "background_rgb": list(bg),
        "parameters": params,
        "render": render,
    }


def _truth_paths(path):
    path = Path(path)
    stem = path.name.split(".")[0]
    return path.with_name(stem + ".truth.csv"), path.with_name(stem + ".truth.json")


def make_synthetic_slide(
    path,
    shape=(2048, 2048),
    mpp=0.5,
    seed=0,
    *,
    stains: StainVectors = H_DAB_DEFAULT,
    background=None,
    hematoxylin_scale=1.0,
    gamma=None,
    noise_sd=1.5,
    compression="jpeg",
    quality=90,
    tile=256,
    **layout_kwargs,
) -> dict:
    """Write a synthetic region as a pyramidal TIFF plus its truth.

    Files: ``path`` (a tiled pyramid in the layout of
    :func:`ihcscore.slide.write_pyramidal_tiff`, JPEG without chroma
    subsampling),
    ``<stem>.truth.csv`` (one row per cell, see :func:`make_synthetic_region`)
    and ``<stem>.truth.json`` (true scores for tumour and all cells, also per
    compartment under ``by_compartment``, the generator parameters and seed).

    Returns
    -------
    dict
        The truth JSON content.
    """
    render_keys = {"residual_od_sd", "blur_sigma_um"}
    rkw = {k: layout_kwargs.pop(k) for k in list(layout_kwargs) if k in render_keys}
    layout = make_synthetic_layout(shape, mpp, seed, **layout_kwargs)
    render = dict(hematoxylin_scale=float(hematoxylin_scale), gamma=gamma, noise_sd=float(noise_sd),
                  residual_od_sd=float(rkw.get("residual_od_sd", 0.01)),
                  blur_sigma_um=float(rkw.get("blur_sigma_um", 0.2)), compression=compression, quality=int(quality))
    rgb = render_layout(layout, stains=stains, background=background, hematoxylin_scale=hematoxylin_scale,
                        gamma=gamma, noise_sd=noise_sd, seed=seed, **rkw)
    path = Path(path)
    _write_pyramid(path, rgb.shape[:2], mpp, [rgb], tile=tile, compression=compression, quality=quality)
    csv_path, json_path = _truth_paths(path)
    meta = _truth_json(layout.truth, layout.params, stains, background, render, path)
    _atomic_write(csv_path, layout.truth.to_csv(index=False, float_format="%.6g"))
    _atomic_write(json_path, json.dumps(meta, indent=2))
    return meta


def _atomic_write(path, text):
    from .atomic import atomic_open

    with atomic_open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------
# Large slides, block by block
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _LargeConfig:
    """Everything a block needs, hashable so block placements can be cached."""

    shape: tuple
    mpp: float
    seed: int
    block_px: int
    counts_per_block: tuple  # ((type, n), ...) for a full block
    bin_probs: tuple  # ((type, (p0, ...)), ...)
    thresholds: tuple
    dab_margin_od: float
    tissue_fraction: float
    nest_fraction: float
    dab_location: str
    cell_expansion_um: float
    membrane_width_um: float
    stains: StainVectors
    background: tuple | None
    hematoxylin_scale: float
    gamma: float | None
    noise_sd: float
    residual_od_sd: float
    blur_sigma_um: float

    @property
    def fields(self):
        return _fields_cached(self.seed, self.tissue_fraction, self.nest_fraction)

    def halo_px(self):
        reach_um = 2 * _MAX_SEMI_MAJOR_UM + self.cell_expansion_um + self.membrane_width_um + 1.0
        return int(np.ceil(reach_um / self.mpp + 3 * self.blur_sigma_um / self.mpp)) + 2


_CACHE_LOCK = threading.Lock()
_FIELDS_CACHE: dict = {}
_BLOCK_CACHE: dict = {}
_BLOCK_CACHE_MAX = 512


def _fields_cached(seed, tissue_fraction, nest_fraction):
    key = (seed, tissue_fraction, nest_fraction)
    with _CACHE_LOCK:
        if key not in _FIELDS_CACHE:
            _FIELDS_CACHE[key] = _Fields.from_seed(seed, tissue_fraction, nest_fraction)
        return _FIELDS_CACHE[key]


def _block_cells(cfg: _LargeConfig, by: int, bx: int):
    """Cells whose nuclei lie in block (by, bx); deterministic from (seed, by, bx)."""
    key = (cfg, by, bx)
    with _CACHE_LOCK:
        hit = _BLOCK_CACHE.get(key)
    if hit is not None:
        return hit
    H, W = cfg.shape
    b = cfg.block_px
    y0, x0 = by * b, bx * b
    h, w = min(b, H - y0), min(b, W - x0)
    frac = h * w / (b * b)
    counts = {k: int(round(n * frac)) for k, n in cfg.counts_per_block}
    rng = np.random.default_rng([cfg.seed, 1, by, bx])
    cells = _place_cells(rng, cfg.fields, x0, y0, h, w, cfg.mpp, counts, dict(cfg.bin_probs),
                         cfg.thresholds, cfg.dab_margin_od)
    with _CACHE_LOCK:
        if len(_BLOCK_CACHE) >= _BLOCK_CACHE_MAX:
            _BLOCK_CACHE.pop(next(iter(_BLOCK_CACHE)))
        _BLOCK_CACHE[key] = cells
    return cells


def _render_block(cfg: _LargeConfig, by: int, bx: int):
    """RGB and truth rows of one block, rendered with its neighbours' cells in a halo."""
    H, W = cfg.shape
    b = cfg.block_px
    nby, nbx = -(-H // b), -(-W // b)
    y0, x0 = by * b, bx * b
    h, w = min(b, H - y0), min(b, W - x0)
    halo = cfg.halo_px()
    own = _block_cells(cfg, by, bx)
    parts = [own]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if (dy or dx) and 0 <= by + dy < nby and 0 <= bx + dx < nbx:
                parts.append(_block_cells(cfg, by + dy, bx + dx))
    cells = {k: np.concatenate([p[k] for p in parts]) for k in own}
    cx0, cy0 = x0 - halo, y0 - halo
    ch, cw = h + 2 * halo, w + 2 * halo
    hem, dab, labels = _paint_canvas(cells, cfg.fields, cx0, cy0, ch, cw, cfg.mpp, cfg.dab_location,
                                     cfg.cell_expansion_um, cfg.membrane_width_um)
    n_own = len(own["type"])
    truth = _cell_table(cells, labels, dab, cfg.mpp, cx0, cy0)
    truth = truth[truth["label"] <= n_own].reset_index(drop=True)
    rng = np.random.default_rng([cfg.seed, 2, by, bx])
    crop = (slice(halo, halo + h), slice(halo, halo + w))
    rgb = _render(hem, dab, crop, rng, cfg.stains, cfg.background, cfg.hematoxylin_scale, cfg.gamma,
                  cfg.noise_sd, cfg.residual_od_sd, cfg.blur_sigma_um / cfg.mpp)
    return rgb, truth


def _render_block_star(args):
    return _render_block(*args)


def _halve(rgb):
    from .slide import _halve as halve

    return halve(rgb)


def _tiles_of(arr, tile):
    """Row-major (tile, tile, 3) tiles of an array, edge tiles zero-padded."""
    h, w = arr.shape[:2]
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = np.asarray(arr[ty:ty + tile, tx:tx + tile])
            if t.shape[:2] != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)))
            yield t


def _write_pyramid(path, shape, mpp, strips, *, tile=256, compression="jpeg", quality=90, min_level_side=512,
                   level_downsample=2):
    """Stream a tiled pyramidal TIFF from horizontal strips of level 0.

    Same layout as :func:`ihcscore.slide.write_pyramidal_tiff` (Aperio-style
    description, resolution tags in pixels per cm, each level half the previous
    one as a tiled ``subfiletype=1`` IFD), but level 0 arrives as an iterable of
    ``(h_i, W, 3)`` strips (every ``h_i`` but the last a multiple of ``tile``)
    and the reduced levels go through memory-mapped temporary files, so the
    whole image never sits in memory. JPEG tiles are written without chroma
    subsampling (4:4:4): 4:2:0 smears 1 µm DAB membranes into their neighbours.
    With ``level_downsample=4`` only every other halving is written, as Aperio
    scanners lay out their pyramids (1, 4, 16, ...).
    """
    import tifffile

    from .slide import _app_mag, _ensure_tifffile_jpeg

    comp = {"jpeg": "jpeg", "zlib": "zlib", None: None}.get(compression, "?")
    if comp == "?":
        raise ValueError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 pixels, got {tile}")
    if level_downsample not in (2, 4):
        raise ValueError(f"level_downsample must be 2 or 4, got {level_downsample}")
    every = 1 if level_downsample == 2 else 2
    path = Path(path)
    H, W = shape
    kwargs = dict(tile=(tile, tile), photometric="rgb", compression=comp, resolutionunit="CENTIMETER",
                  metadata=None, dtype=np.uint8)
    if comp == "jpeg":
        _ensure_tifffile_jpeg()
        kwargs.update(compressionargs={"level": int(quality)}, subsampling=(1, 1))
    comp_name = {"jpeg": f"JPEG/RGB Q={int(quality)}", "zlib": "ZLIB/RGB", None: "RAW/RGB"}[comp]
    desc0 = (f"Aperio Image Library ihcscore synthetic\n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) "
             f"{comp_name}|AppMag = {_app_mag(mpp)}|MPP = {mpp:.6g}")
    level_shapes = [(H, W)]
    while True:
        nh, nw = (level_shapes[-1][0] + 1) // 2, (level_shapes[-1][1] + 1) // 2
        if max(nh, nw) < min_level_side or min(nh, nw) < 1:
            break
        level_shapes.append((nh, nw))

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmpdir = tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent)
    try:
        maps = [np.lib.format.open_memmap(os.path.join(tmpdir, f"level{k}.npy"), mode="w+",
                                          dtype=np.uint8, shape=s + (3,))
                for k, s in enumerate(level_shapes[1:], start=1)]

        def level0_tiles():
            y = 0
            for strip in strips:
                if strip.shape[1] != W or (y + strip.shape[0] < H and strip.shape[0] % tile):
                    raise ValueError(f"strip of shape {strip.shape} does not fit a {W} px wide, "
                                     f"{tile} px tiled level 0")
                if maps:
                    for x in range(0, W, 2048):  # column chunks: no full-width uint16 copy
                        half = _halve(strip[:, x:x + 2048])
                        maps[0][y // 2:y // 2 + half.shape[0], x // 2:x // 2 + half.shape[1]] = half
                y += strip.shape[0]
                yield from _tiles_of(strip, tile)
            if y != H:
                raise ValueError(f"strips cover {y} rows, expected {H}")

        with tifffile.TiffWriter(tmp, bigtiff=H * W * 3 > 2**31) as tw:
            res = 1e4 / mpp
            tw.write(level0_tiles(), shape=(H, W, 3), resolution=(res, res), description=desc0,
                     subfiletype=0, **kwargs)
            for k, m in enumerate(maps, start=1):
                if k < len(maps):
                    step = 512  # rows per chunk: bounded memory for any width
                    for y in range(0, m.shape[0], step):
                        half = _halve(np.asarray(m[y:y + step]))
                        maps[k][y // 2:y // 2 + half.shape[0]] = half
                if k % every:
                    continue
                res = 1e4 / (mpp * 2**k)
                desc = f"Aperio Image Library ihcscore synthetic\n{W}x{H} -> {m.shape[1]}x{m.shape[0]} - "
                tw.write(_tiles_of(m, tile), shape=m.shape, resolution=(res, res), description=desc,
                         subfiletype=1, **kwargs)
        del maps
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        for f in Path(tmpdir).glob("*"):
            f.unlink()
        os.rmdir(tmpdir)
    return path


def _large_config(shape, mpp, seed, block_px, *, density_per_mm2, dab_location, cell_expansion_um,
                  membrane_width_um, thresholds, bin_probabilities, dab_margin_od, tissue_fraction, nest_fraction,
                  stains, background, hematoxylin_scale, gamma, noise_sd, residual_od_sd, blur_sigma_um):
    probs = {k: tuple(v) for k, v in DEFAULT_BIN_PROBABILITIES.items()}
    probs.update({k: tuple(v) for k, v in (bin_probabilities or {}).items()})
    n_bins = len(thresholds) + 1
    _bin_levels(thresholds, dab_margin_od)
    dens = dict(DEFAULT_DENSITY_PER_MM2, **(density_per_mm2 or {}))
    block_mm2 = (block_px * mpp / 1000.0) ** 2
    cfg = _LargeConfig(
        shape=shape, mpp=float(mpp), seed=int(seed), block_px=int(block_px),
        counts_per_block=tuple((k, float(dens[k] * block_mm2)) for k in CELL_TYPES),
        bin_probs=tuple((k, tuple(_bin_probabilities(probs[k], n_bins))) for k in CELL_TYPES),
        thresholds=tuple(float(t) for t in thresholds), dab_margin_od=float(dab_margin_od),
        tissue_fraction=float(tissue_fraction), nest_fraction=float(nest_fraction),
        dab_location=dab_location, cell_expansion_um=float(cell_expansion_um),
        membrane_width_um=float(membrane_width_um), stains=stains,
        background=None if background is None else tuple(float(x) for x in background),
        hematoxylin_scale=float(hematoxylin_scale), gamma=gamma, noise_sd=float(noise_sd),
        residual_od_sd=float(residual_od_sd), blur_sigma_um=float(blur_sigma_um),
    )
    if cfg.halo_px() > block_px:
        raise ValueError(f"block_px {block_px} is smaller than the rendering halo ({cfg.halo_px()} px)")

    return cfg, probs, dens


def write_large_synthetic_slide(
    path,
    shape=(16384, 16384),
    mpp=0.5,
    seed=0,
    *,
    block_px=1024,
    tile=256,
    compression="jpeg",
    quality=90,
    density_per_mm2=None,
    dab_location="cell",
    cell_expansion_um=5.0,
    membrane_width_um=1.0,
    thresholds=(0.2, 0.4, 0.6),
    bin_probabilities=None,
    dab_margin_od=0.05,
    tissue_fraction=0.85,
    nest_fraction=0.5,
    stains: StainVectors = H_DAB_DEFAULT,
    background=None,
    hematoxylin_scale=1.0,
    gamma=None,
    noise_sd=1.5,
    residual_od_sd=0.01,
    blur_sigma_um=0.2,
    min_level_side=512,
    level_downsample=2,
    workers=1,
    progress=None,
) -> dict:
    """Write a large synthetic slide block by block, with its truth.

    Level 0 is generated in ``block_px`` blocks (deterministic per-block
    seeds) and streamed into the TIFF tile by tile; one row of blocks is held
    in memory. Reduced levels (each half the previous, as
    :func:`ihcscore.slide.write_pyramidal_tiff` writes them) go through
    memory-mapped temporary files next to ``path``. The result does not depend
    on ``workers``.

    Parameters
    ----------
    path : str or Path
        Output ``.tif``/``.svs``; ``<stem>.truth.csv`` and ``<stem>.truth.json``
        are written next to it (see :func:`make_synthetic_slide`).
    shape : (int, int)
        Level-0 size (H, W) in pixels.
    block_px : int
        Generation block side (a multiple of ``tile``).
    density_per_mm2 : dict, optional
        Cells per mm² per cell type (defaults :data:`DEFAULT_DENSITY_PER_MM2`).
    level_downsample : {2, 4}
        Downsample between stored pyramid levels: 2 writes every halving, 4 every
        other one (levels 1, 4, 16, ... as Aperio scanners store them, so reading at
        twice the scan's pixel size means reading level 0 and resampling).
    workers : int
        Processes rendering the blocks of a row in parallel.
    progress : callable, optional
        Called as ``progress(blocks_done, blocks_total)``.

    Other parameters are those of :func:`make_synthetic_layout` and
    :func:`render_layout`.

    Returns
    -------
    dict
        The truth JSON content.
    """
    shape = tuple(int(s) for s in shape)
    _check_common(shape, mpp, dab_location)
    if block_px % tile or block_px < 2 * tile:
        raise ValueError(f"block_px must be a multiple of tile ({tile}) and at least 2 tiles, got {block_px}")
    cfg, probs, dens = _large_config(
        shape, mpp, seed, block_px, density_per_mm2=density_per_mm2, dab_location=dab_location,
        cell_expansion_um=cell_expansion_um, membrane_width_um=membrane_width_um, thresholds=thresholds,
        bin_probabilities=bin_probabilities, dab_margin_od=dab_margin_od, tissue_fraction=tissue_fraction,
        nest_fraction=nest_fraction, stains=stains, background=background, hematoxylin_scale=hematoxylin_scale,
        gamma=gamma, noise_sd=noise_sd, residual_od_sd=residual_od_sd, blur_sigma_um=blur_sigma_um)

    path = Path(path)
    H, W = shape
    nby, nbx = -(-H // block_px), -(-W // block_px)
    csv_path, json_path = _truth_paths(path)
    tmp_csv = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    score_cols = ["class", "cell_type", "dab_od"] + [f"dab_od_{c}" for c in COMPARTMENTS]
    kept = []

    def strips(pool):
        n_done, next_label = 0, 1
        for by in range(nby):
            jobs = [(cfg, by, bx) for bx in range(nbx)]
            results = pool.map(_render_block_star, jobs) if pool else map(_render_block_star, jobs)
            parts, truths = [], []
            for rgb, truth in results:
                parts.append(rgb)
                truths.append(truth)
                n_done += 1
                if progress is not None:
                    progress(n_done, nby * nbx)
            truth = pd.concat(truths, ignore_index=True)
            truth["label"] = np.arange(next_label, next_label + len(truth))
            next_label += len(truth)
            with open(tmp_csv, "a") as fh:
                truth.to_csv(fh, index=False, header=by == 0, float_format="%.6g")
            kept.append(truth[score_cols])
            yield np.concatenate(parts, axis=1)

    pool = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=int(workers))
    try:
        if tmp_csv.exists():
            tmp_csv.unlink()
        _write_pyramid(path, shape, mpp, strips(pool), tile=tile, compression=compression, quality=quality,
                       min_level_side=min_level_side, level_downsample=level_downsample)
        os.replace(tmp_csv, csv_path)
    finally:
        if pool is not None:
            pool.shutdown()
        if tmp_csv.exists():
            tmp_csv.unlink()

    truth_all = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=score_cols)
    params = dict(
        shape=list(shape), mpp=float(mpp), seed=int(seed), block_px=int(block_px),
        density_per_mm2=dens, dab_location=dab_location, cell_expansion_um=float(cell_expansion_um),
        membrane_width_um=float(membrane_width_um), thresholds=[float(t) for t in thresholds],
        bin_probabilities={k: list(map(float, v)) for k, v in probs.items()},
        dab_margin_od=float(dab_margin_od), tissue_fraction=float(tissue_fraction),
        nest_fraction=float(nest_fraction),
    )
    render = dict(hematoxylin_scale=float(hematoxylin_scale), gamma=gamma, noise_sd=float(noise_sd),
                  residual_od_sd=float(residual_od_sd), blur_sigma_um=float(blur_sigma_um),
                  compression=compression, quality=int(quality), level_downsample=int(level_downsample))
    meta = _truth_json(truth_all, params, stains, background, render, path)
    _atomic_write(json_path, json.dumps(meta, indent=2))
    return meta
