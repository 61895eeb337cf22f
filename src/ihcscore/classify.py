"""Tumour vs non-tumour cells.

The default is a transparent rule on nucleus morphology, the features a
pathologist uses at a glance (all measured by :mod:`ihcscore.measure`):

* lymphocytes have small (about 5-7 µm), round, dense nuclei: nucleus area
  below ``lymphocyte_max_area_um2`` *and* circularity at least
  ``lymphocyte_min_circularity``;
* stromal cells (fibroblasts, endothelium) have thin elongated nuclei: minor
  axis below ``stroma_max_minor_axis_um`` *and* eccentricity at least
  ``stroma_min_eccentricity``;
* every other detected cell counts as tumour.

Tumour nuclei in carcinomas are typically 50-150 µm² (8-14 µm long), so the
defaults sit between those populations. Lymphocytes matter for CXCR4: they are
strongly positive and would inflate an all-cell score.
"""

from __future__ import annotations

import json

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["MorphologyRule", "classify_cells", "TUMOUR", "OTHER", "CellClassifier", "train_classifier",
           "neighbourhood_features", "feature_matrix", "labels_from_points", "read_point_annotations"]

TUMOUR = "tumour"
OTHER = "other"


@dataclass(frozen=True)
class MorphologyRule:
    """Thresholds of the default rule (µm, µm², unitless shape)."""

    lymphocyte_max_area_um2: float = 38.0
    lymphocyte_min_circularity: float = 0.7
    stroma_max_minor_axis_um: float = 4.5
    stroma_min_eccentricity: float = 0.9

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def classify_cells(table: pd.DataFrame, rule: MorphologyRule = MorphologyRule()) -> np.ndarray:
    """Label each cell ``"tumour"`` or ``"other"`` with the morphology rule.

    Parameters
    ----------
    table : pandas.DataFrame
        Cell measurements (needs ``Nucleus: Area µm^2``, ``Nucleus: Circularity``,
        ``Nucleus: Minor axis µm``, ``Nucleus: Eccentricity``).
    rule : MorphologyRule

    Returns
    -------
    ndarray of str, one per row.
    """
    if len(table) == 0:
        return np.array([], dtype=object)
    area = table["Nucleus: Area µm^2"].to_numpy()
    circ = table["Nucleus: Circularity"].to_numpy()
    minor = table["Nucleus: Minor axis µm"].to_numpy()
    ecc = table["Nucleus: Eccentricity"].to_numpy()
    lymphocyte = (area < rule.lymphocyte_max_area_um2) & (circ >= rule.lymphocyte_min_circularity)
    stroma = (minor < rule.stroma_max_minor_axis_um) & (ecc >= rule.stroma_min_eccentricity)
    return np.where(lymphocyte | stroma, OTHER, TUMOUR).astype(object)


# ------------------------------------------------------------ trainable classifier

#: Measurement columns the trainable classifier uses, when present.
FEATURE_PREFIXES = ("Nucleus: ", "Cell: ", "Cytoplasm: ", "Membrane: ", "Nucleus/Cell")
#: DAB intensities are left out of the features: the classifier must decide tumour vs
#: non-tumour from morphology and hematoxylin, never from the marker it will score.
EXCLUDED_SUBSTRINGS = ("DAB",)
NEIGHBOUR_RADII_UM = (20.0, 50.0)


def neighbourhood_features(table: pd.DataFrame, radii_um=NEIGHBOUR_RADII_UM) -> pd.DataFrame:
    """Context of each cell: density and mean neighbour morphology within each radius (µm).

    Columns: ``Neighbours within {r} µm`` (count, excluding the cell itself),
    ``Neighbour nucleus area mean {r} µm`` and ``Neighbour hematoxylin OD mean {r} µm``
    (NaN without neighbours; filled with the cell's own value). A table of several slides
    marks them in a ``slide`` column: neighbours are only looked for within the same slide.
    """
    from scipy.spatial import cKDTree

    if len(table) and "slide" in table.columns:
        parts = [neighbourhood_features(group.drop(columns="slide"), radii_um)
                 for _, group in table.groupby("slide", sort=False)]
        return pd.concat(parts).loc[table.index]
    out = {}
    n = len(table)
    if n == 0:
        return pd.DataFrame(index=table.index)
    xy = table[["x_um", "y_um"]].to_numpy(dtype=np.float64)
    tree = cKDTree(xy)
    area = table["Nucleus: Area µm^2"].to_numpy(dtype=np.float64)
    hem = table["Nucleus: Hematoxylin OD mean"].to_numpy(dtype=np.float64)
    for r in radii_um:
        pairs = tree.query_pairs(r, output_type="ndarray")
        i = np.concatenate([pairs[:, 0], pairs[:, 1]]) if len(pairs) else np.empty(0, int)
        j = np.concatenate([pairs[:, 1], pairs[:, 0]]) if len(pairs) else np.empty(0, int)
        count = np.bincount(i, minlength=n).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_area = np.bincount(i, weights=area[j], minlength=n) / count
            mean_hem = np.bincount(i, weights=hem[j], minlength=n) / count
        out[f"Neighbours within {r:g} µm"] = count
        out[f"Neighbour nucleus area mean {r:g} µm"] = np.where(count > 0, mean_area, area)
        out[f"Neighbour hematoxylin OD mean {r:g} µm"] = np.where(count > 0, mean_hem, hem)
    return pd.DataFrame(out, index=table.index)


def feature_matrix(table: pd.DataFrame, feature_names=None):
    """The classifier's input: cell measurements (no DAB) plus neighbourhood features.

    Returns ``(X float64 array, feature_names)``; missing values become 0.
    """
    context = neighbourhood_features(table)
    full = pd.concat([table, context], axis=1)
    if feature_names is None:
        feature_names = [c for c in full.columns
                         if isinstance(c, str)
                         and (c.startswith(FEATURE_PREFIXES) or c in context.columns)
                         and not any(s in c for s in EXCLUDED_SUBSTRINGS)
                         and pd.api.types.is_numeric_dtype(full[c])]
    missing = [c for c in feature_names if c not in full.columns]
    if missing:
        raise ValueError(f"the cell table lacks the classifier's features {missing[:5]}")
    X = full[list(feature_names)].to_numpy(dtype=np.float64)
    return np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0), list(feature_names)


#: The only non-default types a classifier file may hold (the fitted trees of the two models).
_TRUSTED_MODEL_TYPES = {"sklearn.tree._tree.Tree",
                        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"}


@dataclass
class CellClassifier:
    """A trained tumour / non-tumour classifier and the features it expects."""

    model: object
    feature_names: list
    classes: tuple = (OTHER, TUMOUR)
    source: str = "trained"
    #: The preset's detection parameters the training cells were found with (their shapes are the features).
    detection: dict | None = None

    def detection_differences(self, detection: dict) -> list[str]:
        """The detection parameters that differ from those the classifier was trained with ([] when it does
        not know them: a file saved before they were recorded)."""
        if self.detection is None:
            return []
        ours, theirs = (json.loads(json.dumps(d)) for d in (self.detection, detection))  # as saved: tuples are lists
        return [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]

    def predict(self, table: pd.DataFrame) -> np.ndarray:
        """``"tumour"`` / ``"other"`` for each row of a cell table."""
        if len(table) == 0:
            return np.array([], dtype=object)
        X, _ = feature_matrix(table, self.feature_names)
        return np.asarray(self.model.predict(X)).astype(object)

    def save(self, path) -> None:
        """Save with skops (no pickle); the file holds the model and its feature names."""
        import skops.io as sio

        from .atomic import atomic_path  # a failed save leaves no half model under the name

        with atomic_path(path) as tmp:
            sio.dump({"model": self.model, "feature_names": list(self.feature_names),
                      "format": "ihcscore-cell-classifier-1",
                      "detection_json": json.dumps(self.detection) if self.detection is not None else ""}, str(tmp))

    @classmethod
    def load(cls, path) -> "CellClassifier":
        """Load a classifier saved by :meth:`save`; refuses files holding unexpected types."""
        import skops.io as sio

        path = str(path)
        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as e:
            raise ValueError(f"{path}: not an ihcscore classifier file ({e})") from None
        allowed = [t for t in untrusted if t in _TRUSTED_MODEL_TYPES]
        refused = sorted(set(untrusted) - set(allowed))
        if refused:
            raise ValueError(f"{path}: refusing to load types {refused}")
        obj = sio.load(path, trusted=allowed)
        if not isinstance(obj, dict) or obj.get("format") != "ihcscore-cell-classifier-1":
            raise ValueError(f"{path}: not an ihcscore classifier file")
        detection = json.loads(obj["detection_json"]) if obj.get("detection_json") else None
        return cls(model=obj["model"], feature_names=list(obj["feature_names"]), source=path, detection=detection)


def train_classifier(table: pd.DataFrame, labels, *, model: str = "random_forest", seed: int = 0) -> CellClassifier:
    """Train a tumour / non-tumour classifier on labelled cells.

    Parameters
    ----------
    table : pandas.DataFrame
        Cell measurements (from :func:`ihcscore.measure.measure_cells`) of the labelled cells
        *and their neighbours*: neighbourhood features are computed on this table, so pass the
        whole region's table and mark unlabelled cells with ``None``.
    labels : sequence of {"tumour", "other", None}
        One per row; rows labelled None are used for context only.
    model : "random_forest" | "gradient_boosting"
    seed : int

    Returns
    -------
    CellClassifier
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier

    labels = np.asarray(labels, dtype=object)
    if len(labels) != len(table):
        raise ValueError(f"{len(labels)} labels for {len(table)} cells")
    known = np.array([lab in (TUMOUR, OTHER) for lab in labels])
    bad = sorted({str(lab) for lab in labels[~known] if lab is not None})
    if bad:
        raise ValueError(f"labels must be 'tumour', 'other' or None, got {bad}")
    if len(set(labels[known])) < 2:
        raise ValueError("training needs labelled cells of both classes (tumour and other)")
    X, names = feature_matrix(table)
    if model == "random_forest":
        clf = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, class_weight="balanced",
                                     random_state=seed, n_jobs=1)
    elif model == "gradient_boosting":
        clf = HistGradientBoostingClassifier(random_state=seed, class_weight="balanced")
    else:
        raise ValueError(f"model must be 'random_forest' or 'gradient_boosting', got {model!r}")
    clf.fit(X[known], labels[known].astype(str))
    return CellClassifier(model=clf, feature_names=names)


def labels_from_points(table: pd.DataFrame, points_xy, point_classes, max_distance_um: float = 6.0,
                       mpp: float | None = None) -> np.ndarray:
    """Transfer point annotations (level-0 px) to the nearest cells within ``max_distance_um``.

    Returns one label per cell (``None`` where no point fell on it).
    """
    from scipy.spatial import cKDTree

    out = np.full(len(table), None, dtype=object)
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    if len(table) == 0 or len(pts) == 0:
        return out
    if mpp is None:
        mpp = float(np.median(table["x_um"] / table["x_px"].where(table["x_px"] != 0)))
    d, idx = cKDTree(table[["x_px", "y_px"]].to_numpy()).query(pts)
    ok = d * mpp <= max_distance_um
    for i, cls in zip(idx[ok], np.asarray(point_classes, dtype=object)[ok]):
        out[i] = cls
    return out


#: Point classes that mean tumour (compared lower-case); every other class is "other".
_TUMOUR_NAMES = {"tumour", "tumor", "1", "epithelium", "true", "yes"}


def read_point_annotations(path):
    """Labelled points for training: ``(xy level-0 px (K, 2), classes)``.

    CSV with columns ``x``, ``y`` (level-0 px) and ``class`` (``tumour``/``tumor``/``1``/``epithelium``
    -> tumour; ``other``/``0``/``stroma``/anything else -> other), or GeoJSON points (QuPath point
    annotations: a FeatureCollection, a list of Features, one Feature or a bare geometry; a feature's
    ``classification.name``, or ``classification`` itself when it is a string as older QuPath versions
    write it, "Tumor"/"Tumour" -> tumour, others -> other).

    Raises
    ------
    ValueError
        One line naming the file and what is wrong in it: not found or unreadable, not text, not
        CSV/JSON/GeoJSON, a missing column, the row (the file's line, header = row 1) or feature
        (numbered from 0) whose coordinate is not a finite number.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: point annotation file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file (byte 0x{e.object[e.start]:02x} at position {e.start} "
                         "is not UTF-8); point annotations are CSV or GeoJSON") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the point annotation file ({e.strerror or e})") from None
    if path.suffix.lower() in (".geojson", ".json"):
        return _points_from_geojson(path, text)
    return _points_from_csv(path, text)


def _point_class(name) -> str:
    return TUMOUR if str(name).strip().lower() in _TUMOUR_NAMES else OTHER


def _points_from_csv(path, text: str):
    import io
    import math

    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; need a header x,y,class and one row per point") from None
    except ValueError as e:  # pandas' ParserError (ragged rows, bad quoting) and the like
        raise ValueError(f"{path}: not a readable CSV file ({' '.join(str(e).split())})") from None
    missing = [c for c in ("x", "y", "class") if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; need x, y (level-0 px) and class")
    # rows as a spreadsheet numbers them (the file's lines, header = row 1): blank lines are skipped
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    row_of = (lambda i: lines[i + 1]) if len(lines) == len(table) + 1 else (lambda i: i + 2)
    xy = np.empty((len(table), 2), dtype=np.float64)
    for i, (x, y) in enumerate(zip(table["x"], table["y"])):
        for j, (col, raw) in enumerate((("x", x), ("y", y))):
            value = str(raw).strip()
            if not value:
                raise ValueError(f"{path}: row {row_of(i)}: {col} is empty")
            try:
                xy[i, j] = float(value)
            except ValueError:
                raise ValueError(f"{path}: row {row_of(i)}: {col} is not a number ({value!r})") from None
            if not math.isfinite(xy[i, j]):
                raise ValueError(f"{path}: row {row_of(i)}: {col} is not a finite number ({value!r})")
    cls = np.array([_point_class(c) for c in table["class"]], dtype=object)
    return xy, cls


def _points_from_geojson(path, text: str):
    import json
    import math
    from numbers import Real

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None

    from .tissue import geojson_features, json_excerpt as shown

    feats = geojson_features(data, path)  # a MaskError is a ValueError
    xy, cls = [], []
    for i, f in enumerate(feats):
        if not isinstance(f, dict):
            raise ValueError(f"{path}: feature {i} is not a JSON object ({shown(f)})")
        geom = f.get("geometry") if ("geometry" in f or f.get("type") == "Feature") else f
        props = f.get("properties")
        if geom is None:
            geom = {}
        if not isinstance(geom, dict):
            raise ValueError(f"{path}: feature {i}: geometry is not a JSON object ({shown(geom)})")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise ValueError(f"{path}: feature {i}: properties is not a JSON object ({shown(props)})")
        kind = geom.get("type")
        if kind not in ("Point", "MultiPoint"):
            continue
        classification = props.get("classification")
        if isinstance(classification, dict):  # QuPath 0.2+: {"name": "Tumor", "color": [...]}
            name = classification.get("name", props.get("class", ""))
        elif classification:  # older QuPath exports: the class name itself
            name = classification
        else:
            name = props.get("class", "")
        coords = geom.get("coordinates")
        if kind == "Point":
            points = [coords]
        elif isinstance(coords, list):
            points = coords
        else:
            raise ValueError(f"{path}: feature {i}: MultiPoint coordinates must be a list of [x, y] points, "
                             f"got {shown(coords)}")
        for k, c in enumerate(points):
            if not (isinstance(c, list) and len(c) in (2, 3)
                    and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in c)):
                where = f"feature {i}" + (f": point {k}" if kind == "MultiPoint" else "")
                raise ValueError(f"{path}: {where}: coordinates must be [x, y] (finite numbers, level-0 px), "
                                 f"got {shown(c)}")
            xy.append(c[:2])
            cls.append(_point_class(name))
    if not xy:
        raise ValueError(f"{path}: no Point features found")
    return np.asarray(xy, dtype=np.float64), np.asarray(cls, dtype=object)
