"""Colour deconvolution for brightfield H-DAB images.

Optical density (OD) per channel follows QuPath and the scoring contract::

    OD = max(0, -log10(max(I, 1) / I0))

with ``I0`` the slide's background (glass) RGB. Stain vectors are unit OD
vectors; the third (residual) vector is the normalised cross product of the
first two. Deconvolution multiplies the OD triple by the inverse of the 3x3
matrix whose rows are the stain vectors, so stain amounts come out in OD units.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "StainVectors",
    "H_DAB_DEFAULT",
    "od_lookup_table",
    "rgb_to_od",
    "od_to_rgb",
    "deconvolve",
    "unmix",
    "estimate_stain_vectors",
    "estimate_background",
    "stain_fit_report",
]


#: A user-supplied stain vector component this little below 0 is rounding, taken as 0; below it, an error.
NEGATIVE_OD_TOLERANCE = 1e-3
_CHANNELS = ("R", "G", "B")


def _three_numbers(value, key: str, what: str = "numbers") -> tuple:
    """``value`` as 3 floats, or a ValueError naming ``key`` (a list, a string, 2 values...)."""
    from numbers import Real

    if (isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or len(value) != 3
            or not all(isinstance(x, Real) and not isinstance(x, bool) for x in value)):
        shown = value.tolist() if isinstance(value, np.ndarray) else value
        raise ValueError(f"{key} must be a list of 3 {what}, got {shown!r}")
    return tuple(float(x) for x in value)


def nonnegative_od_vector(values, key: str) -> tuple[float, float, float]:
    """A user-supplied stain OD vector (a file's, a preset's), checked for negative components.

    Optical density cannot be negative: a component below ``-NEGATIVE_OD_TOLERANCE`` is a
    ``ValueError`` naming ``key``, the channel and the value; smaller negatives (rounding) become 0,
    before the vector is normalised. Vectors estimated from an image are not checked here.
    """
    out = []
    for channel, x in zip(_CHANNELS, (float(v) for v in values)):
        if x < -NEGATIVE_OD_TOLERANCE:
            raise ValueError(f"{key} has a negative component ({channel} = {x:g}): "
                             "optical density cannot be negative")
        out.append(0.0 if x < 0 else x)
    return tuple(out)


def _unit(v) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=float).reshape(3)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge value is reported below, not as a warning
        n = np.linalg.norm(a)
    if not np.isfinite(n) or n == 0:
        raise ValueError(f"stain vector {a.tolist()} has zero or non-finite length")
    return tuple(float(x) for x in a / n)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class StainVectors:
    """Hematoxylin and DAB OD vectors plus the background (glass) RGB.

    Parameters
    ----------
    hematoxylin, dab : sequence of 3 float
        OD vectors (R, G, B); normalised to unit length on construction.
    background : sequence of 3 float
        Background intensity ``I0`` per channel (0-255), default white.
    name : str
        Free text recorded in outputs (e.g. ``"H-DAB default"``, ``"estimated"``).
    """

    hematoxylin: tuple[float, float, float]
    dab: tuple[float, float, float]
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "hematoxylin", _unit(self.hematoxylin))
        object.__setattr__(self, "dab", _unit(self.dab))
        bg = tuple(float(x) for x in np.asarray(self.background, dtype=float).reshape(3))
        if any(not (0 < x <= 255) for x in bg):
            raise ValueError(f"background RGB must be in (0, 255], got {bg}")
        object.__setattr__(self, "background", bg)
        if abs(float(np.dot(self.hematoxylin, self.dab))) > 0.999:
            raise ValueError("hematoxylin and DAB vectors are (nearly) parallel")

    @property
    def residual(self) -> tuple[float, float, float]:
        """Third stain: the normalised cross product of hematoxylin and DAB."""
        return _unit(np.cross(self.hematoxylin, self.dab))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 matrix whose rows are hematoxylin, DAB, residual (unit OD vectors)."""
        return np.array([self.hematoxylin, self.dab, self.residual], dtype=np.float64)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "hematoxylin": list(self.hematoxylin),
            "dab": list(self.dab),
            "residual": list(self.residual),
            "background": list(self.background),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StainVectors":
        """User-supplied vectors (a ``--stains`` file, :meth:`to_dict`'s output).

        ``hematoxylin`` and ``dab`` must be 3 numbers each, none negative (optical density;
        rounding negatives down to ``-NEGATIVE_OD_TOLERANCE`` become 0); ``background``, when
        given, 3 numbers. A ``ValueError`` names the field.
        """
        if not isinstance(d, dict):
            raise ValueError("stain vectors must be a JSON object with 'hematoxylin', 'dab' and optionally "
                             f"'background' (R, G, B), got {type(d).__name__} {_short(d)}")
        for key in ("hematoxylin", "dab"):
            if key not in d:
                raise ValueError(f"stain vectors need key {key!r}")
        vectors = {key: nonnegative_od_vector(_three_numbers(d[key], key, "numbers (R, G, B OD)"), key)
                   for key in ("hematoxylin", "dab")}
        background = d.get("background", (255, 255, 255))
        background = _three_numbers(background, "background", "numbers (R, G, B, 0-255)")
        return cls(**vectors, background=background, name=d.get("name", "custom"))

    @classmethod
    def from_json(cls, path: str | Path) -> "StainVectors":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise ValueError(f"{path}: stain vector file not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not a JSON text file (byte 0x{e.object[e.start]:02x} at position "
                             f"{e.start} is not UTF-8)") from None
        except OSError as e:
            raise ValueError(f"{path}: cannot read the stain vector file ({e.strerror or e})") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: str | Path) -> None:
        from .atomic import atomic_open  # a failed write leaves the old file, never half a new one

        with atomic_open(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2))


#: QuPath's "H-DAB default" stain vectors with a white background.
H_DAB_DEFAULT = StainVectors(
    hematoxylin=(0.65111, 0.70119, 0.29049),
    dab=(0.26917, 0.56824, 0.77759),
    background=(255.0, 255.0, 255.0),
    name="H-DAB default",
)


def od_lookup_table(background=(255, 255, 255)) -> np.ndarray:
    """OD for every 8-bit value, per channel: a ``(3, 256)`` float32 table.

    ``OD = max(0, -log10(max(v, 1) / background))``.
    """
    v = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    bg = np.asarray(background, dtype=np.float64).reshape(3, 1)
    return np.maximum(0.0, -np.log10(v[None, :] / bg)).astype(np.float32)


def rgb_to_od(rgb: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """Per-channel optical density of an RGB image.

    Parameters
    ----------
    rgb : (..., 3) uint8 array
        Brightfield RGB (extra alpha channel is ignored).
    background : sequence of 3 float
        Glass intensity per channel.

    Returns
    -------
    od : (..., 3) float32 array
    """
    rgb = np.asarray(rgb)
    if rgb.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image (..., 3), got shape {rgb.shape}")
    if rgb.dtype == np.uint8 and rgb.ndim == 3:
        try:
            from .kernels import rgb_to_od as _compiled
        except ImportError:  # pragma: no cover - numba missing
            pass
        else:
            return _compiled(rgb, background)  # the same lookup table in one pass
    rgb = rgb[..., :3]
    if rgb.dtype == np.uint8:
        lut = od_lookup_table(background)
        out = np.empty(rgb.shape, dtype=np.float32)
        for c in range(3):
            out[..., c] = lut[c][rgb[..., c]]
        return out
    v = np.maximum(rgb.astype(np.float64), 1.0)
    bg = np.asarray(background, dtype=np.float64)
    return np.maximum(0.0, -np.log10(v / bg)).astype(np.float32)


def od_to_rgb(od: np.ndarray, background=(255, 255, 255), noise_rng=None) -> np.ndarray:
    """Beer-Lambert rendering of OD back to 8-bit RGB: ``I = I0 * 10**(-OD)``."""
    bg = np.asarray(background, dtype=np.float64)
    i = bg * np.power(10.0, -np.asarray(od, dtype=np.float64))
    return np.clip(np.rint(i), 0, 255).astype(np.uint8)


def deconvolve(rgb: np.ndarray, stains: StainVectors = H_DAB_DEFAULT) -> np.ndarray:
    """Colour deconvolution into stain OD channels.

    Parameters
    ----------
    rgb : (..., 3) uint8 array
    stains : StainVectors

    Returns
    -------
    (..., 3) float32 array
        Channels: hematoxylin OD, DAB OD, residual OD.
    """
    return unmix(rgb_to_od(rgb, stains.background), stains)


def unmix(od: np.ndarray, stains: StainVectors = H_DAB_DEFAULT) -> np.ndarray:
    """Stain amounts (hematoxylin, DAB, residual OD) of per-channel optical densities.

    ``od @ inv(M)`` with ``M`` the stain matrix, in float32: :func:`deconvolve`
    without the OD step, for callers that need the OD too.
    """
    return od @ np.linalg.inv(stains.matrix).astype(np.float32)


def _dominant(values: np.ndarray) -> float:
    """The mode: the commonest intensity (glass exactly at it gets OD 0); other data in unit-wide bins
    centred on the integers, so integer-valued floats give the uint8 answer."""
    if values.dtype == np.uint8:
        return float(np.argmax(np.bincount(values, minlength=256)))
    hist, edges = np.histogram(values, bins=256, range=(-0.5, 255.5))
    return float(edges[np.argmax(hist)] + 0.5)


def estimate_background(rgb: np.ndarray, min_brightness: float = 200.0, default=(255, 255, 255)):
    """Background (glass) RGB as the per-channel mode of bright pixels.

    Pixels whose mean intensity is at least ``min_brightness`` count as glass.
    With fewer than 0.5 % such pixels (tissue fills the region) ``default`` is
    returned.
    """
    rgb = np.asarray(rgb)[..., :3].reshape(-1, 3)
    if rgb.dtype == np.uint8:
        # the float mean's test, decided once per channel sum (0..765) instead of per pixel
        bright_sum = np.arange(766, dtype=np.float64) / 3 >= min_brightness
        total = rgb[:, 0].astype(np.uint16)
        total += rgb[:, 1]
        total += rgb[:, 2]
        bright = rgb[bright_sum[total]]
    else:
        bright = rgb[rgb.mean(axis=1) >= min_brightness]
    if len(bright) < max(50, 0.005 * len(rgb)):
        return tuple(float(x) for x in default)
    return tuple(min(255.0, _dominant(bright[:, c])) for c in range(3))


def estimate_stain_vectors(
    rgb: np.ndarray,
    background=None,
    *,
    max_side_px: int = 4000,
    min_od: float = 0.05,
    max_od: float = 1.0,
    percentile: float = 1.0,
) -> StainVectors:
    """Estimate hematoxylin and DAB vectors from a region (QuPath's method).

    The region is downsampled to at most ``max_side_px`` per side and smoothed
    twice with a 3x3 mean filter; pixels with OD >= ``min_od`` in every channel
    and OD magnitude <= ``max_od`` are kept. Their OD vectors are projected onto
    the plane of the first two principal components; the stain vectors are the
    pixels at the ``percentile`` and ``100 - percentile`` angle percentiles.
    The vector closer to the default hematoxylin becomes hematoxylin.

    Parameters
    ----------
    rgb : (M, N, 3) uint8 array
    background : sequence of 3 float, optional
        Glass RGB; estimated with :func:`estimate_background` when None.

    Raises
    ------
    ValueError
        When too few stained pixels are found.
    """
    rgb = np.asarray(rgb)[..., :3]
    if background is None:
        background = estimate_background(rgb)
    step = int(np.ceil(max(rgb.shape[:2]) / max_side_px))
    small = rgb[::step, ::step].astype(np.float32)
    for _ in range(2):
        small = ndi.uniform_filter(small, size=(3, 3, 1), mode="nearest")
    od = rgb_to_od(small, background).reshape(-1, 3).astype(np.float64)
    keep = np.all(od >= min_od, axis=1) & (np.linalg.norm(od, axis=1) <= max_od)
    od = od[keep]
    if len(od) < 100:
        raise ValueError(
            f"only {len(od)} stained pixels with OD in [{min_od}, {max_od}]: "
            "cannot estimate stain vectors from this region"
        )
    # PCA without centering on the mean, as QuPath and Macenko do: the plane
    # through the origin spanned by the two main OD directions.
    _, _, vt = np.linalg.svd(od, full_matrices=False)
    basis = vt[:2]
    if basis[0].sum() < 0:
        basis[0] = -basis[0]
    proj = od @ basis.T
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [percentile, 100 - percentile])
    v1 = np.cos(lo) * basis[0] + np.sin(lo) * basis[1]
    v2 = np.cos(hi) * basis[0] + np.sin(hi) * basis[1]
    v1, v2 = np.abs(v1) / np.linalg.norm(v1), np.abs(v2) / np.linalg.norm(v2)
    # Assign the pair jointly: naming each vector by its own nearest default swaps the stains when
    # both are about equally close to the default hematoxylin (a scanner with a greyer DAB).
    h_ref, d_ref = np.asarray(H_DAB_DEFAULT.hematoxylin), np.asarray(H_DAB_DEFAULT.dab)
    h, d = (v1, v2) if v1 @ h_ref + v2 @ d_ref >= v2 @ h_ref + v1 @ d_ref else (v2, v1)
    return StainVectors(hematoxylin=h, dab=d, background=background, name="estimated")


def stain_fit_report(rgb: np.ndarray, stains: StainVectors = H_DAB_DEFAULT, min_od: float = 0.15) -> dict:
    """How well the H-DAB pair explains the stained pixels of a region.

    Returns a dict with ``stained_fraction`` (pixels with OD sum >= ``min_od``),
    ``residual_fraction`` (share of total OD left in the residual channel over
    stained pixels) and ``dab_fraction`` (share of explained OD that is DAB).
    A brightfield H-DAB slide has a small residual fraction (< ~0.2); H&E or
    fluorescence images do not.
    """
    od = rgb_to_od(rgb, stains.background).reshape(-1, 3)
    stained = od.sum(axis=1) >= min_od
    frac = float(stained.mean()) if od.size else 0.0
    if stained.sum() == 0:
        return {"stained_fraction": frac, "residual_fraction": None, "dab_fraction": None}
    c = od[stained] @ np.linalg.inv(stains.matrix)
    cpos = np.abs(c)
    tot = cpos.sum()
    return {
        "stained_fraction": frac,
        "residual_fraction": float(cpos[:, 2].sum() / tot),
        "dab_fraction": float(np.clip(c[:, 1], 0, None).sum() / max(1e-9, np.clip(c[:, :2], 0, None).sum())),
    }
