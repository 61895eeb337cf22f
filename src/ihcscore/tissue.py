"""Tissue masks on a low-resolution view of a slide.

A mask is a boolean array plus its ``downsample``: mask pixel ``(r, c)`` covers
level-0 pixels ``[c * downsample, (c + 1) * downsample)`` by
``[r * downsample, (r + 1) * downsample)``. Masks come from the image
(:func:`tissue_mask`), from a PNG mask or from GeoJSON annotations
(:func:`mask_from_file`); :func:`resolve_tissue` maps the CLI's
``--tissue auto|all|MASK.png|ANNOTATIONS.geojson`` to one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

try:  # compiled kernels (identical results)
    from . import kernels as _k
except ImportError:  # pragma: no cover - numba missing
    _k = None

__all__ = [
    "MaskError",
    "tissue_mask",
    "mask_from_file",
    "annotations_mask",
    "read_annotations",
    "geojson_features",
    "json_excerpt",
    "rasterize_geometries",
    "resolve_tissue",
    "region_fraction",
]

#: OD-sum thresholds (sum of the three channels' optical densities, with a
#: white 255 background). Glass scans at about 0.05-0.1; faint counterstained
#: tissue at 0.2 or more. The Otsu threshold is clipped into this range so that
#: blank glass gives an empty mask and all-tissue images are not split in two.
OD_SUM_FLOOR = 0.12
OD_SUM_CAP = 0.30
SATURATION_FLOOR = 0.05
SATURATION_CAP = 0.20
#: Default method ("glass"): tissue is anything at least this much darker (OD sum, after ~4 µm
#: smoothing) than the glass, whose colour is the mode of the bright pixels. Otsu alone splits
#: pale tissue into "nuclei vs the rest" when the thumbnail resolves nuclei.
TISSUE_OD_ABOVE_GLASS = 0.05
#: Coarsest useful mask pixel (µm): finer thumbnails are not needed to find tissue.
MASK_PIXEL_UM = 2.0

_IMAGE_MASK_EXT = {".png", ".tif", ".tiff", ".bmp", ".gif", ".jpg", ".jpeg"}
_GEOJSON_EXT = {".geojson", ".json"}


class MaskError(ValueError):
    """A mask or annotation file cannot be used; one line naming the file."""


def _thumb_and_downsample(slide, max_side, min_downsample=1.0):
    if isinstance(slide, np.ndarray):
        return np.asarray(slide), 1.0
    w, h = slide.dimensions
    ds = max(1.0, float(min_downsample), max(w, h) / float(max_side))
    return slide.read_scaled(0, 0, w, h, ds), ds


def _thumb_shape(dimensions, ds):
    w, h = dimensions
    return max(1, int(round(h / ds))), max(1, int(round(w / ds)))


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    """``-log10(max(rgb, 1) / 255)`` in float32, through a 256-entry table when ``rgb`` is uint8."""
    if rgb.dtype == np.uint8:
        return _OD_TABLE[rgb]
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)


_OD_TABLE = -np.log10(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def tissue_mask(slide, max_side=2048, method="glass", *, min_object_um2=2000.0,
                max_hole_um2=20000.0, mpp=None):
    """Detect tissue on a low-resolution thumbnail.

    Parameters
    ----------
    slide : Slide or (H, W, 3) uint8 array
        The slide (read at ``downsample = max(W, H) / max_side``, at least 1),
        or an RGB image used as is (downsample 1).
    max_side : int
        Longer side of the thumbnail in pixels.
    method : {"glass", "otsu", "saturation"}
        ``"glass"`` (default): OD sum at least ``TISSUE_OD_ABOVE_GLASS`` above the
        glass's (estimated as the mode of bright pixels; white if none).
        ``"otsu"``: Otsu threshold of the optical-density sum (smoothed),
        clipped to [``OD_SUM_FLOOR``, ``OD_SUM_CAP``]. ``"saturation"``: Otsu on
        HSV saturation, clipped to [``SATURATION_FLOOR``, ``SATURATION_CAP``],
        for pale but coloured tissue on grey glass.
    min_object_um2 : float
        Tissue pieces smaller than this area (µm²) are removed.
    max_hole_um2 : float
        Holes smaller than this area (µm²) are filled.
    mpp : float, optional
        Level-0 µm/px when ``slide`` is an array (default: ``slide.mpp``, or 0.5).

    Returns
    -------
    mask : (h, w) bool array
    downsample : float
        Level-0 pixels per mask pixel.
    """
    from skimage.morphology import remove_small_holes, remove_small_objects

    mpp_slide = None if isinstance(slide, np.ndarray) else getattr(slide, "mpp", None)
    rgb, ds = _thumb_and_downsample(slide, max_side,
                                    min_downsample=MASK_PIXEL_UM / mpp_slide if mpp_slide else 1.0)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"tissue_mask needs an RGB image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if mpp is None:
        mpp = getattr(slide, "mpp", None) or 0.5
    px_um = float(mpp) * ds  # thumbnail pixel side in µm

    # ~4 µm smoothing (at least half a pixel) so texture does not fragment the mask
    sigma = max(0.5, 4.0 / px_um)
    if method not in ("glass", "otsu", "saturation"):
        raise ValueError(f"method must be 'glass', 'otsu' or 'saturation', got {method!r}")
    if method == "saturation":
        f = rgb.astype(np.float32)
        mx, mn = f.max(axis=-1), f.min(axis=-1)
        sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)
        feat = (_k or ndi).gaussian_filter(sat, sigma)  # kernel: bit-identical
        t = float(np.clip(_otsu(feat), SATURATION_FLOOR, SATURATION_CAP))
    else:
        od = _optical_density(rgb)
        feat = (_k or ndi).gaussian_filter(od.sum(axis=-1), sigma)
        if method == "glass":
            from .stains import estimate_background

            glass = np.asarray(estimate_background(rgb), dtype=np.float64)
            t = float(-np.log10(np.maximum(glass, 1.0) / 255.0).sum()) + TISSUE_OD_ABOVE_GLASS
        else:
            t = float(np.clip(_otsu(feat), OD_SUM_FLOOR, OD_SUM_CAP))
    mask = feat > t

    min_px = int(round(min_object_um2 / px_um**2))
    hole_px = int(round(max_hole_um2 / px_um**2))
    if min_px > 1:
        mask = remove_small_objects(mask, max_size=min_px) if _has_max_size() \
            else remove_small_objects(mask, min_size=min_px)
    if hole_px > 1:
        mask = remove_small_holes(mask, max_size=hole_px) if _has_max_size() \
            else remove_small_holes(mask, area_threshold=hole_px)
    return mask, float(ds)


def _has_max_size() -> bool:
    # scikit-image 0.26 renamed min_size/area_threshold to max_size
    import inspect

    from skimage.morphology import remove_small_objects

    return "max_size" in inspect.signature(remove_small_objects).parameters


# --------------------------------------------------------------------------
# Masks and annotations from files
# --------------------------------------------------------------------------

def _feature_name(props: dict) -> str:
    if not isinstance(props, dict):
        return ""
    name = props.get("name")
    if name:
        return str(name)
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name"):
        return str(cls["name"])
    if isinstance(cls, str):
        return cls
    return ""


def json_excerpt(value, limit=60) -> str:
    """A JSON value as text for an error message, cut to ``limit`` characters."""
    out = json.dumps(value) if isinstance(value, (list, dict, str, int, float, type(None))) else repr(value)
    return out if len(out) <= limit else out[:limit - 3] + "..."


def geojson_features(data, path) -> list:
    """The features of parsed GeoJSON, in any of the forms QuPath and other tools write.

    A FeatureCollection (or an object with ``features``), a list of features, one Feature,
    or a bare geometry (as one feature without properties).

    Raises
    ------
    MaskError
        Anything else, or ``features`` that is not a list: one line naming the file.
    """
    if isinstance(data, dict) and (data.get("type") == "FeatureCollection" or "features" in data):
        features = data.get("features") or []
        if not isinstance(features, list):
            raise MaskError(f"{path}: 'features' must be a list of features, got {json_excerpt(features)}")
        return features
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, dict) and "coordinates" in data:
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise MaskError(f"{path}: not GeoJSON (expected a FeatureCollection, a list of features, a Feature "
                    f"or a geometry), got {json_excerpt(data)}")


def read_annotations(path):
    """Polygon annotations from a GeoJSON file (e.g. a QuPath export).

    Accepts a FeatureCollection, a list of Features, a single Feature or a bare
    geometry. Polygon and MultiPolygon geometries (coordinates in level-0
    pixels) are kept; points and lines are skipped, as are QuPath detections
    and cells (``objectType`` ``detection``/``cell``/``tile``).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of (name, shapely geometry)
        ``name`` is the feature's ``name`` or classification name, or ``""``.

    Raises
    ------
    MaskError
        Missing or unreadable file, invalid JSON/GeoJSON, or no polygons.
    """
    from shapely.geometry import shape
    from shapely.validation import make_valid

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MaskError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from exc

    features = geojson_features(data, path)
    out = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise MaskError(f"{path}: feature {i} is not a JSON object")
        props = feat.get("properties") or {}
        if str(props.get("objectType", "annotation")).lower() in ("detection", "cell", "tile"):
            continue
        geom = feat.get("geometry") if feat.get("type") == "Feature" else feat
        if not geom or geom.get("type") not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue
        try:
            g = shape(geom)
        except Exception as exc:  # noqa: BLE001 - shapely raises several types
            raise MaskError(f"{path}: feature {i} has an invalid {geom.get('type')} "
                            f"({' '.join(str(exc).split())})") from exc
        if not g.is_valid:
            g = make_valid(g)
        if g.geom_type != "Polygon" and g.geom_type != "MultiPolygon":  # a collection: its polygons, merged
            import shapely

            g = make_valid(shapely.union_all(_polygons(g))) if _polygons(g) else shapely.Polygon()
        if g.is_empty:
            continue
        out.append((_feature_name(props), g))
    if not out:
        raise MaskError(f"{path}: no Polygon or MultiPolygon annotations found")
    return out


def _polygons(geom):
    t = geom.geom_type
    if t == "Polygon":
        return [geom]
    if t in ("MultiPolygon", "GeometryCollection"):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []


def rasterize_geometries(geometries, shape, downsample=1.0):
    """Rasterise shapely polygons (level-0 px) into a boolean mask.

    Parameters
    ----------
    geometries : iterable of shapely geometries (or (name, geometry) pairs)
    shape : (int, int)
        Mask (rows, cols).
    downsample : float
        Level-0 pixels per mask pixel. A mask pixel is inside when its centre is.

    Returns
    -------
    (rows, cols) bool array; holes (polygon interiors) are left out.
    """
    from skimage.draw import polygon as draw_polygon

    mask = np.zeros(shape, bool)
    for g in geometries:
        if isinstance(g, tuple):
            g = g[1]
        for poly in _polygons(g):
            # pixel (r, c) has its centre at level-0 ((c + 0.5) * ds, (r + 0.5) * ds)
            def to_px(ring):
                xy = np.asarray(ring.coords, float)
                return xy[:, 1] / downsample - 0.5, xy[:, 0] / downsample - 0.5

            r, c = to_px(poly.exterior)
            inside = np.zeros(shape, bool)
            rr, cc = draw_polygon(r, c, shape)
            inside[rr, cc] = True
            for hole in poly.interiors:
                r, c = to_px(hole)
                rr, cc = draw_polygon(r, c, shape)
                inside[rr, cc] = False
            mask |= inside
    return mask


def annotations_mask(annotations, slide, path, max_side=2048):
    """The tissue mask of annotations already read (:func:`read_annotations` of ``path``), as
    :func:`mask_from_file` makes it.

    Raises
    ------
    MaskError
        The annotations do not overlap the slide (asked of the geometry: an annotation smaller than a
        pixel of the mask still counts, its cells do).
    """
    import shapely

    w, h = slide.dimensions
    if not any(g.intersects(shapely.box(0, 0, w, h)) for _, g in annotations):
        raise MaskError(f"{path}: the annotations do not overlap the slide "
                        f"({w}x{h} px); coordinates must be level-0 pixels")
    ds = max(1.0, max(w, h) / float(max_side))
    return rasterize_geometries([g for _, g in annotations], _thumb_shape((w, h), ds), ds), float(ds)


def mask_from_file(path, slide, max_side=2048):
    """A tissue mask from a PNG/TIFF mask image or a GeoJSON annotation file.

    Parameters
    ----------
    path : str or Path
        An image mask (any size with the slide's aspect ratio; non-zero pixels
        are tissue; a mask with an alpha channel uses alpha) or a GeoJSON file
        of polygon annotations in level-0 pixels (``.geojson``/``.json``).
    slide : Slide
        Supplies the level-0 ``dimensions``.
    max_side : int
        Longer side of the rasterised GeoJSON mask in pixels.

    Returns
    -------
    mask : (h, w) bool array
    downsample : float
        Level-0 pixels per mask pixel.

    Raises
    ------
    MaskError
        One line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise MaskError(f"{path}: no such file")
    if path.is_dir():
        raise MaskError(f"{path}: is a directory, not a mask or annotation file")
    w, h = slide.dimensions
    ext = path.suffix.lower()
    if ext in _GEOJSON_EXT:
        return annotations_mask(read_annotations(path), slide, path, max_side)
    if ext not in _IMAGE_MASK_EXT:
        raise MaskError(f"{path}: unsupported mask file type {ext or '(none)'}; "
                        "use a PNG/TIFF mask or a GeoJSON of annotations")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                a = np.asarray(im)
                alpha = a[..., 3]
                mask = alpha > 0 if (alpha < 255).any() else a[..., :3].max(axis=-1) > 0
            else:
                a = np.asarray(im)
                mask = a.max(axis=-1) > 0 if a.ndim == 3 else a > 0
    except (OSError, UnidentifiedImageError) as exc:
        raise MaskError(f"{path}: not a readable mask image ({' '.join(str(exc).split())})") from exc
    mh, mw = mask.shape
    dsx, dsy = w / mw, h / mh
    if abs(dsx - dsy) > 0.02 * max(dsx, dsy) + 1.0 / min(mw, mh) * max(dsx, dsy):
        raise MaskError(f"{path}: mask is {mw}x{mh} px but the slide is {w}x{h} px "
                        "(different aspect ratio)")
    return mask, float((dsx + dsy) / 2)


def resolve_tissue(slide, tissue="auto", max_side=2048):
    """The mask for ``--tissue auto|all|MASK.png|ANNOTATIONS.geojson``.

    ``"auto"`` runs :func:`tissue_mask`; ``"all"`` (or None) gives a mask that is
    True everywhere; anything else is a file for :func:`mask_from_file`.

    Returns
    -------
    mask : bool array
    downsample : float
    """
    if tissue is None or str(tissue).lower() == "all":
        ds = max(1.0, max(slide.dimensions) / float(max_side))
        return np.ones(_thumb_shape(slide.dimensions, ds), bool), float(ds)
    if str(tissue).lower() == "auto":
        return tissue_mask(slide, max_side=max_side)
    return mask_from_file(tissue, slide, max_side=max_side)


def region_fraction(mask, downsample, x0, y0, w0, h0) -> float:
    """Fraction of a level-0 rectangle covered by the mask (0 outside the mask)."""
    c0 = int(np.floor(x0 / downsample))
    r0 = int(np.floor(y0 / downsample))
    c1 = int(np.ceil((x0 + w0) / downsample))
    r1 = int(np.ceil((y0 + h0) / downsample))
    n = max(1, (r1 - r0) * (c1 - c0))
    sub = mask[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)]
    return float(sub.sum()) / n
