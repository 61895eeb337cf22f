"""Open slides once and share them between the reader and the widget."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ihcscore.slide import Slide, SlideError, _to_rgb_uint8, image_sample_scale, open_slide

__all__ = ["DEFAULT_MPP", "get_slide", "open_for_viewer", "layer_slide", "ArraySource"]

#: Pixel size assumed for files that carry none (PNG/JPEG), µm/px; env ``IHCSCORE_DEFAULT_MPP``.
DEFAULT_MPP = 0.5

_LOCK = threading.Lock()
_SLIDES: dict[tuple[str, float | None], Slide] = {}


def _default_mpp() -> float:
    try:
        v = float(os.environ.get("IHCSCORE_DEFAULT_MPP", DEFAULT_MPP))
        return v if v > 0 else DEFAULT_MPP
    except ValueError:
        return DEFAULT_MPP


def get_slide(path, mpp: float | None = None) -> Slide:
    """An open :class:`ihcscore.slide.Slide` for ``path`` (cached per path and mpp).

    Raises
    ------
    ihcscore.slide.SlideError
    """
    key = (str(Path(path).resolve()), None if mpp is None else float(mpp))
    with _LOCK:
        s = _SLIDES.get(key)
        if s is not None and not s._closed:
            return s
    s = open_slide(path, mpp=mpp)
    with _LOCK:
        _SLIDES[key] = s
    return s


def open_for_viewer(path) -> tuple[Slide, float | None, str | None]:
    """Open a slide for display; a file without pixel size gets :data:`DEFAULT_MPP`.

    Returns
    -------
    slide : Slide
    mpp_override : float or None
        The assumed pixel size, when the file has none.
    warning : str or None
        Set when the pixel size was assumed.
    """
    try:
        return get_slide(path), None, None
    except SlideError as e:
        if "no pixel size" not in str(e):
            raise
        mpp = _default_mpp()
        return get_slide(path, mpp=mpp), mpp, (f"{Path(path).name}: no pixel size in the file; assuming {mpp:g} µm/px "
                                          "(set IHCSCORE_DEFAULT_MPP to change it)")


class ArraySource:
    """A Slide-like view of an in-memory RGB image layer (no file behind it).

    Parameters
    ----------
    data : (H, W, 3) array-like
        Level-0 pixels (numpy or dask).
    mpp : float
        µm per pixel.
    name : str
    smallest : array-like, optional
        The layer's smallest pyramid level, to decide how its samples map to 0-255
        (:func:`ihcscore.slide.sample_scale`) without reading all of ``data``.
    """

    def __init__(self, data, mpp: float, name: str = "image", smallest=None):
        self.data = data
        self.mpp = float(mpp)
        # one mapping to 0-255 for the whole image: a window read must not decide it for itself
        self._scale = image_sample_scale(data if smallest is None else smallest)
        self.name = name
        self.path = None
        h, w = data.shape[:2]
        self.dimensions = (int(w), int(h))
        self.level_count = 1
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)

    def read_region(self, location, level, size):
        import numpy as np

        if level != 0:
            raise ValueError("an in-memory image has level 0 only")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        W, H = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            # uint16 / float / RGBA layers converted as the slide reader converts such files (a plain
            # cast into uint8 wrapped or truncated them)
            out[y0 - y:y1 - y, x0 - x:x1 - x] = _to_rgb_uint8(np.asarray(self.data[y0:y1, x0:x1]), self._scale)
        return out

    def read_scaled(self, x0, y0, w0, h0, downsample):
        import numpy as np

        k = max(1, int(round(float(downsample))))
        a = self.read_region((x0, y0), 0, (w0, h0))
        return a[::k, ::k].copy() if k > 1 else a


def layer_slide(layer):
    """The slide (or :class:`ArraySource`) behind an RGB image layer.

    Layers opened by this plugin carry ``metadata["ihcscore_path"]`` and
    ``metadata["mpp"]`` (and ``"ihcscore_mpp_override"`` when the pixel size
    was assumed). A layer another reader opened from a file (``layer.source.path``)
    is re-opened with the engine so the pixel size comes from the file. Any
    other RGB layer is read from memory, its pixel size from
    ``metadata["mpp"]``, else its ``scale`` when that is not 1, else
    :data:`DEFAULT_MPP` (with a warning).

    Coordinates never depend on this: the widget maps world to level-0 pixels
    through the layer's own transform.
    """
    md = dict(getattr(layer, "metadata", {}) or {})
    if md.get("ihcscore_path"):
        return get_slide(md["ihcscore_path"], mpp=md.get("ihcscore_mpp_override"))
    src = getattr(getattr(layer, "source", None), "path", None)
    if src and Path(src).is_file() and not md.get("mpp"):
        try:
            slide, _, warning = open_for_viewer(src)
            if warning:
                _warn(warning)
            data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
            if tuple(slide.dimensions) == (data.shape[1], data.shape[0]):
                return slide
        except SlideError:
            pass
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    mpp = md.get("mpp")
    if not mpp:
        scale = float(layer.scale[-1])
        if abs(scale - 1.0) > 1e-12:
            mpp = scale
        else:
            mpp = _default_mpp()
            _warn(f"{layer.name}: pixel size unknown (layer scale 1, no metadata['mpp']); assuming {mpp:g} µm/px")
    return ArraySource(data, mpp, name=layer.name,
                       smallest=layer.data[-1] if getattr(layer, "multiscale", False) else None)


def _warn(msg: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(msg)
    except ImportError:  # pragma: no cover - used without napari
        import warnings

        warnings.warn(msg, stacklevel=3)
