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
    "slide_name",
    "open_slide",
    "write_pyramidal_tiff",
]


_OME_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.tf2", ".ome.tf8", ".ome.btf")


def slide_name(path) -> str:
    """A slide's name: its file name without the extension (``.ome.tif`` counts as one)."""
    n = Path(path).name
    for suffix in _OME_SUFFIXES:
        if n.lower().endswith(suffix):
            return n[: -len(suffix)]
    return Path(path).stem


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
        # tifffile >= 2026.4 resolves the (de)compressor tables to imagecodecs' or its own functions only
        # (a RuntimeError otherwise): put ours in the tables' caches, which are looked up first.
        for table, codec in (("COMPRESSORS", _pil_jpeg_encode), ("DECOMPRESSORS", _pil_jpeg_decode)):
            cache = getattr(getattr(_tf.TIFF, table, None), "_codecs", None)
            if isinstance(cache, dict):
                cache.setdefault(7, codec)


# --------------------------------------------------------------------------
# Pixel size helpers
# --------------------------------------------------------------------------

#: Pixel sizes (µm/px) outside this range in resolution tags are treated as
#: "not a microscope pixel size" (e.g. 72 or 300 dpi defaults) and ignored; from
#: any other source (vendor metadata, OME-XML, the ``mpp`` argument) they are an error.
PLAUSIBLE_MPP_UM = (0.02, 20.0)

_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\u00b5m": 1.0,
               "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "pm": 1e-6}


def _plausible(mpp) -> float | None:
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        return None
    if np.isfinite(mpp) and PLAUSIBLE_MPP_UM[0] <= mpp <= PLAUSIBLE_MPP_UM[1]:
        return mpp
    return None


#: Pixel width and height that differ by more than this fraction are not square.
SQUARE_PIXEL_TOLERANCE = 0.01


def _checked_mpp(path, value, source, height=None) -> float:
    """The level-0 pixel size a file records (a number or its text), checked like the resolution tags'.

    ``height``: the pixel height when the file records one (None: square). Raises SlideError, one line
    naming the file and the value, when it is not a number or not in :data:`PLAUSIBLE_MPP_UM`, or
    naming both sizes when the pixels are not square (width and height more than 1 % apart): every
    area and distance would be wrong in one direction.
    """
    sizes = []
    for v in (value, height):
        try:
            # a decimal comma (some scanners' locales) is read as OpenSlide reads it
            sizes.append(None if v is None else float(str(v).strip().replace(",", ".") if isinstance(v, str) else v))
        except (TypeError, ValueError, OverflowError):
            raise SlideError(f"{path}: unreadable pixel size {str(v)!r} in the file ({source}); "
                             "pass --mpp UM") from None
    mpp, mpp_y = sizes
    if _plausible(mpp) is None:
        lo, hi = PLAUSIBLE_MPP_UM
        raise SlideError(f"{path}: implausible pixel size {mpp:g} µm/px in the file ({source}; "
                         f"expected {lo:g}–{hi:g}); pass --mpp UM")
    if mpp_y is not None and not abs(mpp - mpp_y) <= SQUARE_PIXEL_TOLERANCE * max(mpp, abs(mpp_y)):
        raise SlideError(f"{path}: pixels are not square ({mpp:g} x {mpp_y:g} µm); "
                         "resample the image to square pixels")
    return mpp


def _checked_mpp_argument(path, value) -> float:
    """An explicit pixel size (``open_slide(mpp=)``, the CLI's ``--mpp``), checked like the file's."""
    try:
        mpp = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SlideError(f"{path}: mpp must be a number of µm/px, got {value!r}") from None
    if _plausible(mpp) is None:
        lo, hi = PLAUSIBLE_MPP_UM
        raise SlideError(f"{path}: pixel size {mpp:g} µm/px (--mpp) is outside the accepted range "
                         f"{lo:g}–{hi:g} µm/px")
    return mpp


def _resolution_um(res, unit) -> float | None:
    """µm per pixel from a TIFF/PNG resolution (pixels per unit; unit 'inch'/'cm'/'m'), plausible or not."""
    try:
        if isinstance(res, (tuple, list)):
            res = res[0] / res[1] if res[1] else 0
        res = float(res)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not res > 0:
        return None
    per = {"inch": 25400.0, "2": 25400.0, "centimeter": 1e4, "cm": 1e4, "3": 1e4,
           "m": 1e6, "meter": 1e6}.get(str(unit).lower().split(".")[-1])
    return per / res if per else None


def _mpp_from_resolution(xres, unit) -> float | None:
    """µm/px from a TIFF/PNG resolution (pixels per unit); unit 'inch'/'cm'/'m'; None unless plausible."""
    return _plausible(_resolution_um(xres, unit))


def _ome_mpp(ome_xml: str):
    """(PhysicalSizeX, PhysicalSizeY) of the first OME-XML ``Pixels`` that records a PhysicalSizeX, or None.

    Each in µm as a float, or the recorded text (value and unit) when it is not a number in a known
    unit; PhysicalSizeY None when not recorded.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in el.attrib:
            sizes = []
            for axis in "XY":
                value = el.attrib.get(f"PhysicalSize{axis}")
                unit = el.attrib.get(f"PhysicalSize{axis}Unit", "µm")
                try:
                    sizes.append(None if value is None else float(value) * _UNIT_TO_UM[unit])
                except (KeyError, ValueError):
                    sizes.append(f"{value} {unit}")
            return tuple(sizes)
    return None


def _ome_is_fluorescence(ome_xml: str) -> bool:
    return bool(re.search(r'(AcquisitionMode|IlluminationType)="(Wide-?Field)?'
                          r'(Epi)?[Ff]luorescence', ome_xml or ""))


# --------------------------------------------------------------------------
# Backends: each reads level pixels inside the level bounds into a new (h, w, 3) uint8 array
# --------------------------------------------------------------------------

def sample_scale(dtype, top) -> float:
    """Factor from an image's samples to 0-255, decided once per image from its type and its top value.

    ``top``: the image's 99.9th percentile (one hot pixel must not decide). 8-bit: 1. Wider integers:
    the top 8 of the bits the data uses (``>> (bits - 8)``, bits from ``top``: 8-bit data in 16 bits
    stays as it is, 12-bit data keeps its top 8 bits, full-range 16-bit its high byte). Floats: 255 for
    0-1 data (top at most 2: resampling overshoots 1 a little, 0-255 tissue goes far higher), else 1.
    A reader applies the whole image's factor to every window it reads, so a window's pixels never
    depend on what else the window holds (one bright pixel turned a float window's 0-1 data into black).
    """
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.integer):
        bits = max(8, int(np.ceil(np.log2(max(float(top), 1.0) + 1))))
        return 2.0 ** -(min(bits, np.iinfo(dtype).bits) - 8)
    return 255.0 if top <= 2.0 else 1.0


#: Samples of an image :func:`image_sample_scale` looks at, at most (a strided subsample beyond).
SCALE_SAMPLE_PIXELS = 4_000_000


def image_sample_scale(a) -> float:
    """:func:`sample_scale` of a whole image (a numpy or dask array, any shape), from its 99.9th percentile."""
    dtype = np.dtype(a.dtype)
    if dtype == np.uint8 or dtype == np.bool_ or 0 in a.shape:
        return 1.0
    if a.ndim == 3 and a.shape[-1] == 4:  # alpha is opaque at the type's maximum, whatever the colour's bits
        a = a[..., :3]
    elif a.ndim == 3 and a.shape[0] == 4:  # planar RGBA
        a = a[:3]
    # every axis longer than a few channels strided alike: at most about SCALE_SAMPLE_PIXELS samples
    long_axes = [d for d in a.shape if d > 4]
    step = max(1, int(np.ceil((np.prod(long_axes) / SCALE_SAMPLE_PIXELS) ** (1 / max(1, len(long_axes))))))
    sample = np.asarray(a[tuple(slice(None, None, step) if d > 4 else slice(None) for d in a.shape)],
                        dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    return sample_scale(dtype, float(np.percentile(sample, 99.9)) if sample.size else 0.0)


def _to_rgb_uint8(a: np.ndarray, scale: float | None = None, premultiplied: bool = False) -> np.ndarray:
    """Last axis = channels (1, 3 or 4) or none; any dtype -> (h, w, 3) uint8.

    ``scale``: the image's :func:`sample_scale`; None when ``a`` is the whole image (decided from it).
    ``premultiplied``: RGBA whose colour is already multiplied by alpha (TIFF "associated alpha").
    Transparent pixels are composited over white, the colour of glass.
    """
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        else:
            if scale is None:
                scale = image_sample_scale(a)
            values = np.nan_to_num(a.astype(np.float64)) * scale
            # integers keep their top bits (floor), floats round to the nearest level
            values = np.floor(values) if np.issubdtype(a.dtype, np.integer) else np.round(values)
            a = np.clip(values, 0, 255).astype(np.uint8)
    c = a.shape[-1]
    if c == 1:
        return np.repeat(a, 3, axis=-1)
    if c == 4:
        if a[..., 3].min(initial=255) == 255:  # opaque (every tile inside the scanned area): no blending
            return np.ascontiguousarray(a[..., :3])
        alpha = a[..., 3:4].astype(np.uint16)
        rgb = a[..., :3].astype(np.uint16)
        if premultiplied:  # colour x alpha is stored: over white add what the alpha lets through
            return np.minimum(rgb + (255 - alpha), 255).astype(np.uint8)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def _is_plain_rgb_tiled(page) -> bool:
    """Whether tifffile decodes the tiles of ``page`` to the RGB that OpenSlide shows.

    Tiled, 8-bit RGB samples stored contiguously, no predictor, and JPEG
    (RGB or YCbCr), deflate or no compression. JPEG 2000 and anything else
    is left to OpenSlide.
    """
    if not (page.is_tiled and page.planarconfig == 1 and page.samplesperpixel == 3
            and page.bitspersample == 8 and page.sampleformat == 1
            and page.imagedepth == 1 and page.predictor == 1):
        return False
    if page.compression == 7:
        return page.photometric in (2, 6)
    return page.compression in (1, 8, 32946) and page.photometric == 2


class _OpenSlideBackend:
    def __init__(self, path: Path):
        import openslide

        self._openslide = openslide
        self.osr = openslide.OpenSlide(str(path))
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self.osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self.osr.level_downsamples)
        self.properties = dict(self.osr.properties)
        self.vendor = self.properties.get("openslide.vendor", "openslide")
        self.channels = 3
        self.tile_sizes = []
        for i in range(len(self.level_dimensions)):
            t = self.properties.get(f"openslide.level[{i}].tile-width")
            t = int(t) if t and t.isdigit() else 512
            self.tile_sizes.append(t if 128 <= t <= 2048 else 512)
        self._lock = threading.Lock()
        self._tiff = None
        self._pages = [None] * len(self.level_dimensions)
        if self.vendor in ("aperio", "generic-tiff"):
            try:
                self._open_tiff(path)
            except Exception:  # noqa: BLE001 - OpenSlide reads what tifffile cannot
                self._pages = [None] * len(self.level_dimensions)

    def _open_tiff(self, path):
        """Find the tifffile page of each level whose tiles can be decoded directly."""
        import tifffile

        _ensure_tifffile_jpeg()
        self._tiff = tifffile.TiffFile(str(path))
        tiled = [p for p in self._tiff.pages if p.is_tiled]
        complete = True  # no zero-length (missing) tile in this level or a finer one
        for level, (w, h) in enumerate(self.level_dimensions):
            same = [p for p in tiled if (p.imagewidth, p.imagelength) == (w, h)]
            page = same[0] if len(same) == 1 else None
            complete = complete and page is not None and 0 not in page.databytecounts
            # OpenSlide resamples when a level-0 location is not a whole level pixel
            # (non-integer downsample), and its Aperio reader redraws the missing
            # tiles of a reduced level, and those below a missing tile of a finer
            # level, from the finer level: those are left to OpenSlide.
            if (page is not None and _is_plain_rgb_tiled(page)
                    and self.level_downsamples[level].is_integer()
                    and (complete or level == 0 or self.vendor != "aperio")):
                self._pages[level] = page

    def mpp(self):
        """(pixel width and height as recorded, where) or Nones; :func:`open_slide` checks them."""
        p = self.properties
        desc = p.get("tiff.ImageDescription") or ""
        if self.vendor == "generic-tiff" and "PhysicalSizeX" in desc:
            # a tiled OME-TIFF is a generic TIFF to OpenSlide, which knows nothing of its OME-XML
            m = _ome_mpp(desc)
            if m is not None:
                return m[0], m[1], "OME PhysicalSizeX"
        v = p.get("openslide.mpp-x")
        # a generic TIFF's openslide.mpp-x is its resolution tags (centimetres), whose implausible
        # values (dpi defaults) mean "no pixel size", as below and in the tifffile reader
        if v and not (self.vendor == "generic-tiff" and _plausible(v) is None):
            return v, p.get("openslide.mpp-y") or None, "openslide.mpp-x"
        if self.vendor == "aperio" and p.get("aperio.MPP", "").strip():
            return p["aperio.MPP"].strip(), None, "Aperio MPP"  # one OpenSlide could not parse
        unit = p.get("tiff.ResolutionUnit")
        m = _mpp_from_resolution(p.get("tiff.XResolution"), unit)
        if m:
            return m, _resolution_um(p.get("tiff.YResolution"), unit), "tiff.XResolution"
        return None, None, None

    def reads_exactly(self, level) -> bool:
        """Tiles read by position, or a whole-number downsample OpenSlide maps to whole pixels."""
        ds = self.level_downsamples[level]
        return self._pages[level] is not None or abs(ds - round(ds)) < 1e-9

    def read_level(self, level, x, y, w, h):
        page = self._pages[level]
        if page is not None:
            try:
                return self._read_tiles(page, x, y, w, h)
            except Exception:  # noqa: BLE001 - OpenSlide reads (or reports) what tifffile cannot decode
                pass
        ds = self.level_downsamples[level]
        # x, y are level pixels; OpenSlide wants the level-0 location
        img = self.osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return _to_rgb_uint8(np.asarray(img))

    def _read_tiles(self, page, x, y, w, h):
        """Decode the tiles of ``page`` that cover a region into one (h, w, 3) array.

        The same pixels as OpenSlide's ``read_region``, without its ARGB
        compositing: each tile is decoded by tifffile and its part of the
        region copied once into the output.
        """
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        index = [r * across + c for r in range(y // th, (y + h - 1) // th + 1)
                 for c in range(x // tw, (x + w - 1) // tw + 1)]
        data = [self._read_bytes(page.dataoffsets[i], page.databytecounts[i]) for i in index]
        out = np.empty((h, w, 3), np.uint8)
        for i, d in zip(index, data):
            ty, tx = i // across * th, i % across * tw
            y0, y1 = max(y, ty), min(y + h, ty + th)
            x0, x1 = max(x, tx), min(x + w, tx + tw)
            if d:
                tile = page.decode(d, i, jpegtables=page.jpegtables)[0]
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[0, y0 - ty:y1 - ty, x0 - tx:x1 - tx]
            else:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = 255  # missing tile: transparent in OpenSlide, glass here
        return out

    def _read_bytes(self, offset, count):
        if hasattr(os, "pread"):
            # positional reads: no shared file position between threads, nor with a forked process
            return os.pread(self._tiff.filehandle.fileno(), count, offset)
        fh = self._tiff.filehandle
        with self._lock:
            fh.seek(offset)
            return fh.read(count)

    def associated_images(self):
        return {k: _to_rgb_uint8(np.asarray(v)) for k, v in self.osr.associated_images.items()}

    def close(self):
        self.osr.close()
        if self._tiff is not None:
            self._tiff.close()


class _TiffBackend:
    def __init__(self, path: Path):
        import tifffile
        import zarr

        _ensure_tifffile_jpeg()
        self.tf = tifffile.TiffFile(str(path))
        self._lock = threading.RLock()
        tf = self.tf
        series = [s for s in tf.series
                  if (s.name or "").lower() not in ("thumbnail", "label", "macro", "map")]
        if not series:
            series = list(tf.series)
        if not series:
            raise SlideError(f"{path}: TIFF has no images")
        self.series = series[0]
        self._associated = [s for s in tf.series if s is not self.series]
        levels = list(self.series.levels)
        # tifffile treats an Aperio-described file as SVS and may list
        # reduced-resolution tiled pages as separate series: collect them.
        if len(levels) == 1:
            w0 = levels[0].shape[levels[0].axes.index("X")]
            extra = []
            for s in self._associated:
                if "X" in s.axes and s.axes == levels[0].axes and s.dtype == levels[0].dtype:
                    p = s.pages[0] if s.pages else None
                    # vendor thumbnails/labels are stripped; tiled smaller images are levels
                    if p is not None and getattr(p, "is_tiled", False) and s.shape[s.axes.index("X")] < w0:
                        extra.append(s)
            if extra:
                extra.sort(key=lambda s: -s.shape[s.axes.index("X")])
                levels += extra
                self._associated = [s for s in self._associated if s not in extra]
        self.axes = levels[0].axes
        self.dtype = levels[0].dtype
        self._layout = self._channel_layout(path, levels[0].axes, levels[0].shape)
        self.channels = self._layout[1]
        n_native = len(self.series.levels)
        self._arrays = []
        for i, lev in enumerate(levels):
            store = self.series.aszarr(level=i) if i < n_native else lev.aszarr()
            self._arrays.append(zarr.open(store, mode="r"))
        dims = []
        for lev in levels:
            sh = lev.shape
            dims.append((int(sh[lev.axes.index("X")]), int(sh[lev.axes.index("Y")])))
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self.level_downsamples = tuple(float((w0 / w + h0 / h) / 2) for w, h in dims)
        self.tile_sizes = []
        for lev in levels:
            p = lev.pages[0] if lev.pages else None
            t = int(getattr(p, "tilewidth", 0) or 0)
            self.tile_sizes.append(t if 128 <= t <= 2048 else 512)
        if tf.is_ome:
            self.vendor = "ome-tiff"
        elif tf.is_ndpi:
            self.vendor = "hamamatsu-ndpi"
        elif tf.is_svs:
            self.vendor = "aperio-svs"
        else:
            self.vendor = "tiff"
        page0 = tf.pages[0]
        self.properties = {"tifffile.series_axes": self.axes, "tifffile.dtype": str(self.dtype)}
        for tag in ("ImageDescription", "Software", "Make", "Model", "XResolution",
                    "YResolution", "ResolutionUnit"):
            t = page0.tags.get(tag)
            if t is not None:
                v = t.value
                if tag == "ResolutionUnit":
                    v = getattr(v, "name", v)
                self.properties[f"tiff.{tag}"] = str(v)
        self.fluorescence = bool(tf.is_ome and _ome_is_fluorescence(tf.ome_metadata or ""))
        self._scale = None  # see _sample_scale
        extra = getattr(page0, "extrasamples", None) or ()
        self._premultiplied = 1 in [int(x) for x in extra]  # TIFF ExtraSamples 1: associated alpha

    @staticmethod
    def _channel_layout(path, axes, shape):
        """Return (axis name holding channels or None, n channels)."""
        sizes = dict(zip(axes, shape))
        extra = [a for a in axes if a not in "YXSC" and sizes[a] > 1]
        if extra:
            raise SlideError(f"{path}: unsupported image layout {axes} {tuple(shape)}: "
                             "expected one 2-D plane (RGB or grayscale)")
        if sizes.get("S", 1) > 1 and sizes.get("C", 1) > 1:
            raise SlideError(f"{path}: unsupported channel layout {axes} {tuple(shape)}")
        ax = "S" if sizes.get("S", 1) > 1 else ("C" if sizes.get("C", 1) > 1 else None)
        n = sizes[ax] if ax else 1
        if n not in (1, 3, 4):
            raise SlideError(f"{path}: unsupported channel layout: {n} channels (axes {axes}); "
                             "expected RGB, RGBA or a single channel")
        return ax, n

    def mpp(self):
        """(pixel width and height as recorded, where) or Nones; :func:`open_slide` checks them."""
        tf = self.tf
        p = tf.pages[0]
        xr, yr = p.tags.get("XResolution"), p.tags.get("YResolution")
        if tf.is_ome:
            m = _ome_mpp(tf.ome_metadata or "")
            if m is not None:
                return m[0], m[1], "OME PhysicalSizeX"
        if tf.is_imagej:
            md = tf.imagej_metadata or {}
            unit = str(md.get("unit", "")).replace("\\u00B5", "µ")
            if unit in _UNIT_TO_UM:
                if xr is not None and xr.value[0]:
                    m = _plausible(xr.value[1] / xr.value[0] * _UNIT_TO_UM[unit])
                    if m:
                        h = None
                        if yr is not None and yr.value[0]:
                            h = yr.value[1] / yr.value[0] * _UNIT_TO_UM[unit]
                        return m, h, "ImageJ unit"
        if tf.is_svs:
            m = re.search(r"\|\s*MPP\s*=([^|\r\n]*)", p.description or "")
            if m and m.group(1).strip():
                return m.group(1).strip(), None, "Aperio MPP"
        ru = p.tags.get("ResolutionUnit")
        if xr is not None and ru is not None:
            unit = getattr(ru.value, "name", str(ru.value))
            m = _mpp_from_resolution(xr.value, unit)
            if m:
                return m, _resolution_um(yr.value, unit) if yr is not None else None, "tiff.XResolution"
        return None, None, None

    def read_level(self, level, x, y, w, h):
        z = self._arrays[level]
        axes = self.axes
        sl = []
        for a in axes:
            if a == "Y":
                sl.append(slice(y, y + h))
            elif a == "X":
                sl.append(slice(x, x + w))
            elif a in "SC" and a == self._layout[0]:
                sl.append(slice(None))
            else:
                sl.append(0)
        with self._lock:
            a = np.asarray(z[tuple(sl)])
        kept = [ax for ax, s in zip(axes, sl) if isinstance(s, slice)]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index(self._layout[0])]
                                                       if self._layout[0] else [])
        a = np.transpose(a, order)
        return _to_rgb_uint8(a, self._sample_scale(), self._premultiplied)

    def _sample_scale(self) -> float:
        """The image's :func:`sample_scale`, from its smallest level, once (every window the same)."""
        if self._scale is None:
            if np.dtype(self.dtype) == np.uint8:
                self._scale = 1.0
            else:
                with self._lock:
                    smallest = np.asarray(self._arrays[-1][...])
                self._scale = image_sample_scale(smallest)
        return self._scale

    def associated_images(self):
        out = {}
        with self._lock:
            for s in self._associated:
                name = (s.name or f"series{s.index}").lower()
                try:
                    a = s.asarray()
                except Exception:  # noqa: BLE001 - a broken label must not break the slide
                    continue
                if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
                    a = np.moveaxis(a, 0, -1)
                if a.ndim in (2, 3):
                    out[name] = _to_rgb_uint8(a)
        return out

    def close(self):
        self.tf.close()


class _ArrayBackend:
    """A flat image held in memory (PNG, JPEG, BMP, ...)."""

    def __init__(self, path: Path):
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            self.properties = {f"image.{k}": str(v) for k, v in im.info.items()
                               if isinstance(v, (str, int, float, tuple))}
            self.vendor = (im.format or "image").lower()
            dpi = im.info.get("dpi")
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA")
            elif mode == "CMYK" or mode == "YCbCr":
                im = im.convert("RGB")
            elif mode == "LA":
                im = im.convert("RGBA")
            elif mode == "1":
                im = im.convert("L")
            a = np.asarray(im)
        if a.ndim == 3 and a.shape[-1] not in (1, 3, 4):
            raise SlideError(f"{path}: unsupported channel layout: {a.shape[-1]} channels")
        self.channels = 1 if a.ndim == 2 else a.shape[-1]
        self.is_gray_mode = mode in ("L", "LA", "1", "I", "I;16", "I;16B", "F")
        self.image = _to_rgb_uint8(a)
        self._dpi = dpi
        h, w = self.image.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.tile_sizes = [512]

    def mpp(self):
        """(pixel width and height, where) or Nones; :func:`open_slide` checks them."""
        if self._dpi:
            m = _mpp_from_resolution(self._dpi[0], "inch")
            if m:
                h = _resolution_um(self._dpi[1], "inch") if len(self._dpi) > 1 else None
                return m, h, "image dpi"
        return None, None, None

    def read_level(self, level, x, y, w, h):
        return self.image[y:y + h, x:x + w].copy()

    def associated_images(self):
        return {}

    def close(self):
        self.image = None


# --------------------------------------------------------------------------
# Slide
# --------------------------------------------------------------------------

class Slide:
    """An opened slide: levels, pixel size and RGB reading (see :func:`open_slide`).

    Attributes
    ----------
    path : Path
    name : str
        File stem (for ``x.ome.tif``, ``x``).
    mpp : float
        Pixel size at level 0 in µm/px.
    mpp_source : str
        Where ``mpp`` came from (e.g. ``"openslide.mpp-x"``, ``"OME PhysicalSizeX"``,
        ``"argument"``).
    dimensions : (int, int)
        Level-0 (width, height) in pixels.
    level_count, level_dimensions, level_downsamples
        As in OpenSlide; downsamples are relative to level 0.
    properties : dict
        Metadata as strings (OpenSlide properties when OpenSlide reads the file).
    vendor : str
        OpenSlide vendor (``aperio``, ``hamamatsu``, ``generic-tiff``...) or the
        fallback reader's format (``ome-tiff``, ``tiff``, ``png``, ...).
    """

    def __init__(self, path, backend, mpp, mpp_source):
        self.path = Path(path)
        self._backend = backend
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.level_dimensions = backend.level_dimensions
        self.level_downsamples = backend.level_downsamples
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.properties = dict(backend.properties)
        self.vendor = backend.vendor
        self._modality = None
        self._associated = None
        self._closed = False

    # -- identity -------------------------------------------------------
    @property
    def name(self) -> str:
        return slide_name(self.path)

    def __repr__(self):
        w, h = self.dimensions
        return (f"Slide({self.path.name!r}, {w}x{h} px, mpp={self.mpp:.4g} µm/px, "
                f"levels={self.level_count}, vendor={self.vendor!r})")

    # -- modality -------------------------------------------------------
    @property
    def modality(self) -> str:
        """``"brightfield"``, ``"fluorescence"`` (dark background) or ``"grayscale"``.

        Judged from the channel layout, OME metadata and a small thumbnail:
        a median brightest channel below 80 means dark background (fluorescence);
        identical R, G and B means a single-channel image.
        """
        if self._modality is None:
            b = self._backend
            if getattr(b, "channels", 3) == 1 or getattr(b, "is_gray_mode", False):
                self._modality = "grayscale"
            elif getattr(b, "fluorescence", False):
                self._modality = "fluorescence"
            else:
                th = self.thumbnail(256)
                if np.median(th.max(axis=-1)) < 80:
                    self._modality = "fluorescence"
                elif np.array_equal(th[..., 0], th[..., 1]) and np.array_equal(th[..., 1], th[..., 2]):
                    self._modality = "grayscale"
                else:
                    self._modality = "brightfield"
        return self._modality

    @property
    def is_brightfield_rgb(self) -> bool:
        """True for a 3-channel RGB brightfield image (what IHC scoring needs)."""
        return self.modality == "brightfield"

    # -- reading --------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise SlideError(f"{self.path}: slide is closed")

    def _read_level_padded(self, level, x, y, w, h) -> np.ndarray:
        """Level pixels [y, y+h) x [x, x+w); outside the level is white (255)."""
        self._check_open()
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w < 0 or h < 0:
            raise ValueError(f"region size must be non-negative, got {(w, h)}")
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lw), min(y + h, lh)
        if not (x1 > x0 and y1 > y0):
            return np.full((h, w, 3), 255, np.uint8)
        try:
            a = self._backend.read_level(level, x0, y0, x1 - x0, y1 - y0)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder errors name the file
            raise SlideError(f"{self.path}: cannot read level {level} at "
                             f"({x0}, {y0}) size {(x1 - x0, y1 - y0)}: "
                             f"{_one_line(exc)}") from exc
        if (x0, y0, x1, y1) == (x, y, x + w, y + h):
            return a  # inside the level: the backend's array is the result
        out = np.full((h, w, 3), 255, np.uint8)
        out[y0 - y:y1 - y, x0 - x:x1 - x] = a
        return out

    def read_region(self, location, level, size) -> np.ndarray:
        """Read a region like OpenSlide, as RGB.

        Parameters
        ----------
        location : (int, int)
            Top-left (x, y) in level-0 pixels.
        level : int
        size : (int, int)
            (width, height) in pixels of ``level``.

        Returns
        -------
        (h, w, 3) uint8 array; pixels outside the slide are white (255).
        """
        ds = self.level_downsamples[level]
        x = int(np.floor(location[0] / ds + 1e-9))
        y = int(np.floor(location[1] / ds + 1e-9))
        return self._read_level_padded(level, x, y, size[0], size[1])

    def read_level_region(self, level, location, size) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` at ``location`` (x, y) given in that level's own pixels.

        No round trip through level-0 coordinates: at a fractional level downsample (a level of an
        odd-sized scan is 1.9995x, not 2x) that round trip can land one pixel off, so a tile would
        read its pixels shifted. White outside the level.
        """
        return self._read_level_padded(level, int(location[0]), int(location[1]), int(size[0]), int(size[1]))

    def level_reads_exactly(self, level: int) -> bool:
        """Whether ``level``'s pixels are read as stored. False where OpenSlide would be asked for a
        position between its pixels (a fractional downsample, not read tile by tile) and resample."""
        check = getattr(self._backend, "reads_exactly", None)
        return True if check is None else bool(check(level))

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (nearest finer)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = i if d >= self.level_downsamples[best] else best
        return best

    def read_scaled(self, x0, y0, w0, h0, downsample) -> np.ndarray:
        """Read a level-0 rectangle at any downsample >= 1.

        Reads from the nearest finer level and resizes by area averaging
        (integer factors) or anti-aliased linear interpolation; a downsample
        equal to a level's is read from that level unchanged.

        Parameters
        ----------
        x0, y0, w0, h0 : int
            Rectangle in level-0 pixels.
        downsample : float
            Level-0 pixels per output pixel (>= 1).

        Returns
        -------
        (round(h0 / downsample), round(w0 / downsample), 3) uint8 array.
        """
        downsample = float(downsample)
        if not downsample >= 1.0:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        ow = max(1, int(round(w0 / downsample)))
        oh = max(1, int(round(h0 / downsample)))
        level = self.best_level_for_downsample(downsample)
        lds = self.level_downsamples[level]
        lx = int(round(x0 / lds))
        ly = int(round(y0 / lds))
        factor = downsample / lds
        if abs(factor - 1) < 1e-3:
            return self._read_level_padded(level, lx, ly, ow, oh)
        k = int(round(factor))
        if abs(factor - k) < 1e-3:
            from .kernels import bin_mean_uint8

            return bin_mean_uint8(self._read_level_padded(level, lx, ly, ow * k, oh * k), k)
        from skimage.transform import resize

        lw = max(1, int(round(w0 / lds)))
        lh = max(1, int(round(h0 / lds)))
        a = self._read_level_padded(level, lx, ly, lw, lh)
        kf = int(np.floor(factor))
        if kf >= 2:
            # area-average by the integer part first (fast, exact), then resize
            # the small remainder with anti-aliasing
            a = _block_mean(a, kf)
        r = resize(a, (oh, ow, 3), order=1, anti_aliasing=True, preserve_range=True,
                   mode="edge")
        return np.clip(np.round(r), 0, 255).astype(np.uint8)

    def thumbnail(self, max_side=1024) -> np.ndarray:
        """The whole slide with its longer side at most ``max_side`` pixels (RGB uint8)."""
        w, h = self.dimensions
        ds = max(1.0, max(w, h) / float(max_side))
        return self.read_scaled(0, 0, w, h, ds)

    @property
    def associated_images(self) -> dict:
        """Label, macro, thumbnail... as RGB uint8 arrays (empty dict if none)."""
        self._check_open()
        if self._associated is None:
            try:
                self._associated = self._backend.associated_images()
            except Exception:  # noqa: BLE001 - associated images are optional extras
                self._associated = {}
        return self._associated

    def to_dask_pyramid(self) -> list:
        """One lazy dask array (H, W, 3) uint8 per level, chunked by tile; tiles are read on demand."""
        import dask.array as da

        self._check_open()
        levels = []
        for level, (w, h) in enumerate(self.level_dimensions):
            t = self._backend.tile_sizes[level]
            chunks = (_chunks(h, t), _chunks(w, t), (3,))

            def read_block(block_info=None, level=level):
                (ys, ye), (xs, xe), _ = block_info[None]["array-location"]
                return self._read_level_padded(level, xs, ys, xe - xs, ye - ys)

            levels.append(da.map_blocks(read_block, chunks=chunks, dtype=np.uint8,
                                        meta=np.empty((0, 0, 0), np.uint8),
                                        name=f"ihcscore-{self.name}-L{level}-{id(self)}"))
        return levels

    # -- lifetime -------------------------------------------------------
    def close(self):
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """k x k area average; edges are padded by repetition to a multiple of k."""
    h, w = a.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    s = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k, 3).astype(np.float32).mean(axis=(1, 3))
    return s


def _chunks(n, t):
    return tuple([t] * (n // t) + ([n % t] if n % t else [])) or (0,)


# --------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _rgba_cannot_decode(page) -> str | None:
    """Why libtiff's RGBA interface (OpenSlide's decoder for non-JPEG tiles) cannot decode a tiled page, or None.

    It takes 1, 2, 4, 8 and 16-bit integer samples only: float samples ("can not handle images with IEEE
    floating-point samples") and 32/64-bit ones ("... with 32-bit samples") fail on the first read, and
    16-bit ones lose their low byte (8-bit or 12-bit data in 16 bits turns black): tifffile reads those,
    with the image's own mapping to 0-255 (:func:`sample_scale`).
    """
    if not getattr(page, "is_tiled", False):
        return None  # OpenSlide reads tiled images only
    bits, fmt = int(getattr(page, "bitspersample", 8)), int(getattr(page, "sampleformat", 1))
    if bits == 16 and fmt in (1, 2, 4):
        return "libtiff's RGBA decoding keeps the high byte of 16-bit samples"
    if fmt not in (1, 2, 4) or bits not in (1, 2, 4, 8, 16):
        kind = {1: "integer", 2: "signed integer", 3: "floating-point"}.get(fmt, f"format {fmt}")
        return f"libtiff cannot decode {bits}-bit {kind} samples"
    return None


def _check_tiff_complete(path: Path, size: int) -> str | None:
    """Raise SlideError if the TIFF structure is unreadable or its data runs past the end.

    Returns why OpenSlide could not decode the samples of one of its tiled images (see
    :func:`_rgba_cannot_decode`), or None.
    """
    import tifffile

    undecodable = None
    try:
        with tifffile.TiffFile(str(path)) as tf:
            end = 0
            for page in tf.pages:
                offs, counts = page.dataoffsets, page.databytecounts
                if len(offs):
                    end = max(end, int(np.max(np.asarray(offs, np.int64) + np.asarray(counts, np.int64))))
                undecodable = undecodable or _rgba_cannot_decode(page)
            n_pages = len(tf.pages)
    except SlideError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SlideError(f"{path}: corrupt or truncated TIFF ({_one_line(exc)})") from exc
    if n_pages == 0:
        raise SlideError(f"{path}: TIFF has no images (corrupt or truncated)")
    if end > size:
        raise SlideError(f"{path}: truncated TIFF: image data runs to byte {end} "
                         f"but the file has {size} bytes")
    return undecodable


def open_slide(path, mpp=None) -> Slide:
    """Open a whole-slide image or a plain image.

    Tries OpenSlide (SVS, NDPI, MRXS, SCN, tiled generic TIFF, ...), then
    tifffile (OME-TIFF, plain or pyramidal TIFF), then Pillow (PNG, JPEG, ...).

    Parameters
    ----------
    path : str or Path
    mpp : float, optional
        Pixel size at level 0 in µm/px. Used when the file has none, and
        overrides the file's value when given (then the file's is not checked).
        Accepted range :data:`PLAUSIBLE_MPP_UM` (0.02–20 µm/px).

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        One line naming the file: missing, a directory, empty, corrupt or
        truncated, not an image, unsupported channel layout, no pixel size
        (``"<file>: no pixel size in the file; pass --mpp UM"``), a recorded
        pixel size that is not a number or outside 0.02–20 µm/px (the message
        names it and ends ``pass --mpp UM``), non-square pixels (width and
        height more than 1 % apart: ``"<file>: pixels are not square (0.5 x 1
        µm); resample the image to square pixels"``), or an ``mpp`` argument
        outside 0.02–20 µm/px.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SlideError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from exc
    if size == 0:
        raise SlideError(f"{path}: empty file")
    if mpp is not None:
        mpp = _checked_mpp_argument(path, mpp)

    is_tiff = magic in _TIFF_MAGIC
    undecodable = _check_tiff_complete(path, size) if is_tiff else None

    backend = None
    errors = []
    try:
        import openslide

        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001 - no OpenSlide or detection failed
        vendor = None
    if vendor is not None and undecodable:
        # OpenSlide opens such a file and fails on its first read: tifffile reads it
        errors.append(f"OpenSlide: {undecodable}")
    elif vendor is not None:
        try:
            backend = _OpenSlideBackend(path)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"OpenSlide: {_one_line(exc)}")
    if backend is None and is_tiff:
        try:
            backend = _TiffBackend(path)
        except SlideError:
            raise
        except Exception as exc:  # noqa: BLE001
            errors.append(f"tifffile: {_one_line(exc)}")
    if backend is None and not is_tiff:
        from PIL import UnidentifiedImageError

        try:
            backend = _ArrayBackend(path)
        except SlideError:
            raise
        except UnidentifiedImageError:
            errors.append("format not recognised by OpenSlide, tifffile or Pillow")
        except Exception as exc:  # noqa: BLE001
            errors.append(_one_line(exc))
    if backend is None:
        why = "; ".join(errors) or "unknown format"
        if is_tiff:
            raise SlideError(f"{path}: cannot read TIFF ({why})")
        raise SlideError(f"{path}: not a readable slide or image file ({why})")

    try:
        if mpp is not None:  # the file's own pixel size is not looked at, nor checked
            use_mpp, source = mpp, "argument"
        else:
            file_mpp, file_mpp_y, source = backend.mpp()
            if file_mpp is None:
                raise SlideError(f"{path}: no pixel size in the file; pass --mpp UM")
            use_mpp = _checked_mpp(path, file_mpp, source, height=file_mpp_y)
        w, h = backend.level_dimensions[0]
        if w < 1 or h < 1:
            raise SlideError(f"{path}: image has no pixels ({w}x{h})")
        return Slide(path, backend, use_mpp, source)
    except BaseException:
        backend.close()
        raise


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

    # classic TIFF offsets are 32-bit: switch to BigTIFF well before the raw
    # size of all levels (4/3 of level 0) could pass 4 GiB
    bigtiff = w * h * 3 * 4 // 3 > 2**31
    kwargs = dict(tile=(tile, tile), photometric="rgb", compression=comp,
                  resolutionunit="CENTIMETER", metadata=None)
    if comp == "jpeg":
        kwargs["compressionargs"] = {"level": int(quality)}
        # Full-resolution colour (4:4:4): tifffile's default 4:2:0 subsampling shares one colour sample per
        # 2x2 block, which smears 1 µm DAB membranes into their neighbours (up to 0.3 OD).
        kwargs["subsampling"] = (1, 1)

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
