"""Open whole-slide images and plain images; write pyramidal TIFFs.

Readers are tried in order: OpenSlide (vendor formats and tiled generic TIFF),
tifffile (OME-TIFF, plain and pyramidal TIFF, SubIFDs), then imageio/PIL for
PNG/JPEG and other flat images. Every reader is wrapped in the same small
:class:`Slide` API (see ``docs/engine-api.md``).

Coordinates follow OpenSlide: ``read_region`` takes its location in level-0
pixels and its size in pixels of the requested level. Pixel size (``mpp``) is
in micrometres per pixel at level 0.
"""

from __future__ import annotations

import io
import os
import re
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "SlideError",
    "Slide",
    "open_slide",
    "write_pyramidal_tiff",
]


class SlideError(ValueError):
    """A slide cannot be opened or read; the message names the file, in one line."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------
# JPEG tiles for tifffile without imagecodecs
# --------------------------------------------------------------------------
# tifffile needs the optional ``imagecodecs`` package to encode or decode JPEG
# tiles. When it is missing we register small Pillow-based codecs in tifffile's
# codec caches so that writing (and reading OME-TIFF/JPEG through tifffile)
# works with the declared dependencies only.

def _pil_jpeg_encode(data, level=None, **kwargs):
    from PIL import Image

    a = np.asarray(data)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(a))
    # JFIF YCbCr without chroma subsampling under photometric RGB: OpenSlide
    # and tifffile both convert it back to RGB. (An Adobe-marker RGB JPEG,
    # Pillow's keep_rgb, comes back with scrambled colours from OpenSlide.)
    im.save(buf, "JPEG", quality=int(level if level is not None else 90),
            subsampling=0)
    return buf.getvalue()


def _pil_jpeg_decode(data, bitspersample=None, tables=None, header=None,
                     colorspace=None, outcolorspace=None, shape=None, out=None,
                     **kwargs):
    from PIL import Image

    data = bytes(data)
    if header:
        data = bytes(header) + data
    if tables and len(tables) > 4:
        # JPEGTables = SOI + tables + EOI; splice the tables after the tile's SOI
        data = data[:2] + bytes(tables)[2:-2] + data[2:]
    im = Image.open(io.BytesIO(data))
    if colorspace in (2, "RGB", "rgb") and im.mode == "RGB" and "jfif" not in im.info \
            and "adobe" not in im.info:
        # Aperio-style RGB JPEG without markers: tell libjpeg not to convert
        # from YCbCr (Pillow passes the tile's jpegmode to the decoder).
        im.tile = [t._replace(args=("RGB", "RGB")) if hasattr(t, "_replace")
                   else (t[0], t[1], t[2], ("RGB", "RGB")) for t in im.tile]
    a = np.asarray(im)
    if a.ndim == 2 and outcolorspace in (2, "RGB", "rgb"):
        a = np.repeat(a[..., None], 3, axis=-1)
    if shape is not None and tuple(a.shape[:2]) != tuple(shape[:2]):
        h, w = shape[:2]
        a = a[:h, :w]
    return a


_CODECS_LOCK = threading.Lock()


def _ensure_tifffile_jpeg() -> None:
    """Register Pillow JPEG codecs in tifffile when imagecodecs is missing."""
    from tifffile import tifffile as _tf

    if hasattr(_tf.imagecodecs, "jpeg_decode") and hasattr(_tf.imagecodecs, "jpeg_encode"):
        return
    # tifffile looks the functions up on its fallback codec module at call time.
    with _CODECS_LOCK:
        if not hasattr(_tf.imagecodecs, "jpeg_encode"):
            _tf.imagecodecs.jpeg_encode = _pil_jpeg_encode
        if not hasattr(_tf.imagecodecs, "jpeg_decode"):
            _tf.imagecodecs.jpeg_decode = _pil_jpeg_decode


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------

def _halve(rgb: np.ndarray) -> np.ndarray:
    """2x2 area average; odd sizes are padded by repeating the last row/column."""
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    h2, w2 = rgb.shape[0] // 2, rgb.shape[1] // 2
    s = rgb.reshape(h2, 2, w2, 2, rgb.shape[2]).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def _app_mag(mpp: float) -> int:
    # Nominal objective power for the Aperio header: 0.5 µm/px ~ 20x, 0.25 ~ 40x.
    mag = 10.0 / mpp
    for m in (1, 2, 2.5, 4, 5, 10, 20, 40, 60, 63, 80, 100):
        if abs(m - mag) / m < 0.35:
            return int(m) if float(m).is_integer() else m
    return max(1, int(round(mag)))


def write_pyramidal_tiff(path, rgb, mpp, *, tile=256, compression="jpeg", quality=90,
                         min_level_side=512, levels=None, aperio=True,
                         extra_description=None):
    """Write an RGB image as a tiled pyramidal TIFF that OpenSlide and tifffile open.

    Level 0 is the full-resolution image; each further level halves the previous
    one (2x2 area average) and is stored as a tiled IFD with
    ``subfiletype=1`` (reduced resolution), the layout OpenSlide needs. The file
    is written to a temporary name in the same folder and renamed when complete.

    Parameters
    ----------
    path : str or Path
        Output file (``.tif``/``.tiff``; ``.svs`` also works with ``aperio``).
    rgb : (H, W, 3) uint8 array
        The level-0 image.
    mpp : float
        Pixel size at level 0 in µm/px, stored in the resolution tags (pixels
        per cm) and, with ``aperio``, as ``MPP`` in the description.
    tile : int
        Tile side in pixels (multiple of 16).
    compression : {"jpeg", "zlib", None}
        ``"jpeg"`` is lossy (``quality`` 1-100); ``"zlib"`` is lossless.
    quality : int
        JPEG quality.
    min_level_side : int
        Keep adding levels while the longer side of the next level is at
        least this many pixels. Ignored when ``levels`` is given.
    levels : int, optional
        Total number of levels (including level 0).
    aperio : bool
        Write an Aperio-style ImageDescription so OpenSlide reports vendor
        ``aperio`` with ``openslide.mpp-x`` and objective power; otherwise
        OpenSlide opens the file as ``generic-tiff`` (mpp from resolution tags).
    extra_description : str or dict, optional
        Extra ``key = value`` fields appended to the Aperio description (a dict,
        or a string already formatted as ``"key = value|key2 = value2"``); with
        ``aperio=False``, a string used as the whole ImageDescription.

    Returns
    -------
    Path
        The path written.
    """
    import tifffile

    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected an (H, W, 3) uint8 RGB array, "
                         f"got shape {rgb.shape} dtype {rgb.dtype}")
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"{path.name}: mpp must be a positive number of µm/px, got {mpp}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 pixels, got {tile}")
    comp = {None: None, "none": None, "jpeg": "jpeg", "zlib": "zlib",
            "deflate": "zlib"}.get(compression if compression is None else str(compression).lower(), "?")
    if comp == "?":
        raise ValueError(f"compression must be 'jpeg', 'zlib' or None, got {compression!r}")
    if comp == "jpeg":
        _ensure_tifffile_jpeg()
    h, w = rgb.shape[:2]

    if aperio:
        comp_name = {"jpeg": f"JPEG/RGB Q={int(quality)}", "zlib": "ZLIB/RGB",
                     None: "RAW/RGB"}[comp]
        desc = (f"Aperio Image Library ihcscore\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                f"{comp_name}|AppMag = {_app_mag(mpp)}|MPP = {mpp:.6g}")
        if isinstance(extra_description, dict):
            desc += "".join(f"|{k} = {v}" for k, v in extra_description.items())
        elif extra_description:
            desc += "|" + str(extra_description).strip("|")
    else:
        desc = extra_description if isinstance(extra_description, str) else None

    n_px = w * h * 3
    bigtiff = n_px * 4 // 3 > 2**31 if comp is None else n_px > 2**32
    kwargs = dict(tile=(tile, tile), photometric="rgb", compression=comp,
                  resolutionunit="CENTIMETER", metadata=None)
    if comp == "jpeg":
        kwargs["compressionargs"] = {"level": int(quality)}

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            level_img = rgb
            ds = 1
            level_idx = 0
            while True:
                res = 1e4 / (mpp * ds)  # pixels per cm
                tw.write(level_img, resolution=(res, res), description=desc,
                         subfiletype=1 if level_idx else 0, **kwargs)
                level_idx += 1
                nh, nw = (level_img.shape[0] + 1) // 2, (level_img.shape[1] + 1) // 2
                if levels is not None:
                    if level_idx >= int(levels):
                        break
                elif max(nh, nw) < min_level_side or min(nh, nw) < 1:
                    break
                if min(level_img.shape[:2]) < 2:
                    break
                level_img = _halve(level_img)
                ds *= 2
                if aperio:
                    desc = (f"Aperio Image Library ihcscore\n{w}x{h} -> "
                            f"{level_img.shape[1]}x{level_img.shape[0]} - ")
                else:
                    desc = None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
