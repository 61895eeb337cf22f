"""Marker presets: every stain, detection and scoring parameter in one TOML file.

A preset file has four parts (see ``DESIGN.md``, "Presets")::

    name = "ki67"
    [stains]     estimate, hematoxylin, dab, background
    [detection]  the fields of :class:`ihcscore.cells.DetectionParams`
    [scoring]    compartment, statistic, thresholds, cells

Missing keys take their defaults; an unknown table or key, a wrong type or an
out-of-range value (such as a negative stain vector component: optical density
cannot be negative) is a ``ValueError`` whose message starts with the file and
names the key, e.g. ``"my.toml: unknown key 'detection.foo'"``.

Packaged presets live in ``ihcscore/presets/<name>.toml``;
:func:`available_presets` lists them and :func:`load_preset` loads one by name
or any file by path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from numbers import Real
from pathlib import Path

from .cells import DetectionParams
from .scoring import CELL_GROUPS, COMPARTMENTS, STATISTICS, ScoringScheme, validate_thresholds
from .stains import StainVectors, nonnegative_od_vector

__all__ = [
    "DEFAULT_HEMATOXYLIN",
    "DEFAULT_DAB",
    "DEFAULT_BACKGROUND",
    "DETECTION_IMAGES",
    "StainSettings",
    "Preset",
    "available_presets",
    "load_preset",
    "preset_from_dict",
]

#: QuPath's "H-DAB default" vectors as written in presets (unnormalised literals).
DEFAULT_HEMATOXYLIN = (0.65111, 0.70119, 0.29049)
DEFAULT_DAB = (0.26917, 0.56824, 0.77759)
DEFAULT_BACKGROUND = (255.0, 255.0, 255.0)
#: Values of ``detection.image``.
DETECTION_IMAGES = ("hematoxylin", "od_sum")


def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _vec3(value, key: str) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ValueError(f"{key} must be a list of 3 numbers, got {value!r}")
    if not all(_is_number(x) and math.isfinite(x) for x in value):
        raise ValueError(f"{key} must be a list of 3 finite numbers, got {list(value)!r}")
    return tuple(float(x) for x in value)


@dataclass(frozen=True)
class StainSettings:
    """The preset's ``[stains]`` table.

    Parameters
    ----------
    estimate : bool
        True: estimate stain vectors and background per slide (``--stains auto``);
        the vectors below are then only the fallback.
    hematoxylin, dab : sequence of 3 float
        OD vectors (R, G, B); normalised when turned into :class:`StainVectors`.
    background : sequence of 3 float
        Glass RGB intensity per channel, 0-255.
    """

    estimate: bool = False
    hematoxylin: tuple[float, float, float] = DEFAULT_HEMATOXYLIN
    dab: tuple[float, float, float] = DEFAULT_DAB
    background: tuple[float, float, float] = DEFAULT_BACKGROUND

    def __post_init__(self):
        if not isinstance(self.estimate, bool):
            raise ValueError(f"stains.estimate must be true or false, got {self.estimate!r}")
        for key in ("hematoxylin", "dab", "background"):
            object.__setattr__(self, key, _vec3(getattr(self, key), f"stains.{key}"))
        if any(not (0 < x <= 255) for x in self.background):
            raise ValueError(f"stains.background must be 3 values in (0, 255], got {list(self.background)}")
        try:
            self.to_stain_vectors()
        except ValueError as e:
            raise ValueError(f"stains: {e}") from None

    @property
    def is_default(self) -> bool:
        """True when the vectors and background are QuPath's "H-DAB default"."""
        return (self.hematoxylin, self.dab, self.background) == (
            DEFAULT_HEMATOXYLIN, DEFAULT_DAB, DEFAULT_BACKGROUND)

    def to_stain_vectors(self, name: str | None = None) -> StainVectors:
        """The fixed vectors as :class:`~ihcscore.stains.StainVectors`."""
        if name is None:
            name = "H-DAB default" if self.is_default else "preset"
        return StainVectors(self.hematoxylin, self.dab, self.background, name=name)

    @classmethod
    def from_stain_vectors(cls, stains: StainVectors, estimate: bool = False) -> "StainSettings":
        return cls(estimate=estimate, hematoxylin=stains.hematoxylin, dab=stains.dab,
                   background=stains.background)

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "hematoxylin": list(self.hematoxylin),
                "dab": list(self.dab), "background": list(self.background)}


# ---------------------------------------------------------------------------
# detection parameter checks (DetectionParams itself does not validate)

_DETECTION_FIELDS = {f.name: f for f in dataclasses.fields(DetectionParams)}
# key -> (lower bound, inclusive?) for numeric detection keys
_DETECTION_BOUNDS = {
    "pixel_size_um": (0.0, False),
    "background_radius_um": (0.0, True),
    "median_radius_um": (0.0, True),
    "sigma_um": (0.0, True),
    "threshold": (None, True),
    "min_area_um2": (0.0, True),
    "max_area_um2": (0.0, False),
    "max_background": (0.0, True),
    "cell_expansion_um": (0.0, True),
    "membrane_width_um": (0.0, True),
}


def _check_detection_value(key: str, value):
    """Return the checked value of detection key ``key``; ValueError names the key."""
    f = _DETECTION_FIELDS[key]
    default = f.default
    name = f"detection.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        if key == "image" and value not in DETECTION_IMAGES:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, DETECTION_IMAGES))}; got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        value = float(value)
        lo, inclusive = _DETECTION_BOUNDS.get(key, (None, True))
        if lo is not None and (value < lo or (value == lo and not inclusive)):
            raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {lo:g}, got {value:g}")
        return value
    return value  # pragma: no cover - a field type this module does not know


def _check_detection(params: DetectionParams) -> DetectionParams:
    values = {k: _check_detection_value(k, getattr(params, k)) for k in _DETECTION_FIELDS}
    if values["min_area_um2"] > values["max_area_um2"]:
        raise ValueError(
            f"detection.min_area_um2 ({values['min_area_um2']:g}) must not exceed "
            f"detection.max_area_um2 ({values['max_area_um2']:g})")
    return DetectionParams(**values)


def _check_scoring(table: dict) -> ScoringScheme:
    defaults = ScoringScheme()
    kw = {}
    for key in ("compartment", "statistic", "cells"):
        if key in table:
            v = table[key]
            allowed = {"compartment": COMPARTMENTS, "statistic": STATISTICS, "cells": CELL_GROUPS}[key]
            if not isinstance(v, str) or v not in allowed:
                raise ValueError(f"scoring.{key} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
            kw[key] = v
    if "thresholds" in table:
        try:
            kw["thresholds"] = validate_thresholds(table["thresholds"])
        except ValueError as e:
            raise ValueError(f"scoring.thresholds: {e}") from None
    return dataclasses.replace(defaults, **kw)


# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A complete set of stain, detection and scoring parameters.

    Parameters
    ----------
    name : str
    stains : StainSettings
    detection : ihcscore.cells.DetectionParams
    scoring : ihcscore.scoring.ScoringScheme
    source : str, optional
        File the preset was loaded from (not part of equality).
    """

    name: str
    stains: StainSettings = field(default_factory=StainSettings)
    detection: DetectionParams = field(default_factory=DetectionParams)
    scoring: ScoringScheme = field(default_factory=ScoringScheme)
    source: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"preset name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.stains, StainSettings):
            raise TypeError("stains must be a StainSettings")
        if not isinstance(self.scoring, ScoringScheme):
            raise TypeError("scoring must be a ScoringScheme")
        if not isinstance(self.detection, DetectionParams):
            raise TypeError("detection must be a DetectionParams")
        object.__setattr__(self, "detection", _check_detection(self.detection))

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable), e.g. for ``summary.json``."""
        return {
            "name": self.name,
            "stains": self.stains.to_dict(),
            "detection": dataclasses.asdict(self.detection),
            "scoring": self.scoring.to_dict(),
        }

    def to_toml(self) -> str:
        """The preset as a commented TOML document that :func:`load_preset` reads back."""
        return _to_toml(self)

    def replace(
        self,
        *,
        name: str | None = None,
        thresholds=None,
        compartment: str | None = None,
        statistic: str | None = None,
        cells: str | None = None,
        estimate_stains: bool | None = None,
        stain_vectors: StainVectors | None = None,
        **detection,
    ) -> "Preset":
        """A copy with some parameters overridden (the CLI flags).

        Parameters
        ----------
        name : str, optional
        thresholds : float or sequence of float, optional
            1 or 3 OD thresholds (``--thresholds``).
        compartment, statistic, cells : str, optional
            Scoring overrides (``--compartment``).
        estimate_stains : bool, optional
            Estimate stains per slide (``--stains auto``) or not.
        stain_vectors : StainVectors, optional
            Fixed vectors and background (``--stains FILE.json``); also sets
            ``estimate`` to False unless ``estimate_stains`` says otherwise.
        **detection
            Any :class:`~ihcscore.cells.DetectionParams` field, e.g.
            ``pixel_size_um=0.5``.

        Raises
        ------
        ValueError
            For an unknown detection key or an invalid value (naming the key).
        """
        unknown = sorted(set(detection) - set(_DETECTION_FIELDS))
        if unknown:
            raise ValueError(f"unknown key 'detection.{unknown[0]}'")
        scoring = {k: v for k, v in (("thresholds", thresholds), ("compartment", compartment),
                                     ("statistic", statistic), ("cells", cells)) if v is not None}
        scheme = _check_scoring({**self.scoring.to_dict(), **scoring})
        det = dict(dataclasses.asdict(self.detection))
        for k, v in detection.items():
            det[k] = _check_detection_value(k, v)
        stains = self.stains
        if stain_vectors is not None:
            stains = StainSettings.from_stain_vectors(stain_vectors, estimate=False)
        if estimate_stains is not None:
            stains = dataclasses.replace(stains, estimate=bool(estimate_stains))
        return Preset(name=self.name if name is None else name, stains=stains,
                      detection=_check_detection(DetectionParams(**det)), scoring=scheme,
                      source=self.source)


# ---------------------------------------------------------------------------
# reading


def preset_from_dict(data: dict, source: str = "<preset>", default_name: str = "custom") -> Preset:
    """Build a :class:`Preset` from parsed TOML; errors start with ``source``."""
    try:
        return _from_dict(data, default_name)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _from_dict(data: dict, default_name: str) -> Preset:
    allowed = {"name", "stains", "detection", "scoring"}
    for key in data:
        if key not in allowed:
            raise ValueError(f"unknown key {key!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    tables = {}
    for tname, keys in (("stains", [f.name for f in dataclasses.fields(StainSettings)]),
                        ("detection", list(_DETECTION_FIELDS)),
                        ("scoring", [f.name for f in dataclasses.fields(ScoringScheme)])):
        table = data.get(tname, {})
        if not isinstance(table, dict):
            raise ValueError(f"{tname} must be a table ([{tname}]), got {table!r}")
        for key in table:
            if key not in keys:
                raise ValueError(f"unknown key '{tname}.{key}'")
        tables[tname] = table
    stain_table = dict(tables["stains"])
    for key in ("hematoxylin", "dab"):  # a user's vectors: optical density cannot be negative
        if key in stain_table:
            stain_table[key] = nonnegative_od_vector(_vec3(stain_table[key], f"stains.{key}"), f"stains.{key}")
    stains = StainSettings(**stain_table)
    det = {k: _check_detection_value(k, v) for k, v in tables["detection"].items()}
    detection = _check_detection(DetectionParams(**det))
    scoring = _check_scoring(tables["scoring"])
    return Preset(name=name, stains=stains, detection=detection, scoring=scoring)


def _packaged_dir():
    return resources.files("ihcscore").joinpath("presets")


def available_presets() -> list[str]:
    """Names of the presets packaged with ihcscore, sorted."""
    return sorted(p.name[:-5] for p in _packaged_dir().iterdir() if p.name.endswith(".toml"))


def _load_text(text: str, source: str, default_name: str) -> Preset:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML ({e})") from None
    preset = preset_from_dict(data, source, default_name)
    return dataclasses.replace(preset, source=source)


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a packaged preset by name, or a preset file by path.

    Parameters
    ----------
    name_or_path : str or pathlib.Path
        A bare name (``"cxcr4"``, see :func:`available_presets`) or the path of
        a ``.toml`` file. A name without the file's ``name`` key takes the file
        stem as its name.

    Raises
    ------
    ValueError
        Unknown preset, unreadable file, invalid TOML, unknown key, wrong type
        or value; the message names the file and the key.
    """
    arg = str(name_or_path)
    is_path = isinstance(name_or_path, Path) or "/" in arg or "\\" in arg or arg.endswith(".toml")
    if not is_path:
        res = _packaged_dir().joinpath(f"{arg}.toml")
        if res.is_file():
            return _load_text(res.read_text(encoding="utf-8"), f"preset {arg!r} ({arg}.toml)", arg)
        if not Path(arg).is_file():
            raise ValueError(
                f"unknown preset {arg!r}: packaged presets are {', '.join(available_presets())}; "
                "or give the path of a .toml file")
    path = Path(arg)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: preset file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read preset file ({e})") from None
    return _load_text(text, str(path), path.stem)


# ---------------------------------------------------------------------------
# writing

_STAIN_COMMENTS = {
    "estimate": "true: estimate vectors and background per slide (= --stains auto)",
    "hematoxylin": "OD vector (R, G, B); QuPath 'H-DAB default'",
    "dab": "OD vector (R, G, B); QuPath 'H-DAB default'",
    "background": "glass RGB intensity, 0-255",
}
_DETECTION_COMMENTS = {
    "image": '"hematoxylin" | "od_sum" (OD sum also finds strongly DAB-stained nuclei)',
    "exclude_dab": "true: mask out pixels where DAB OD > hematoxylin OD (membrane markers)",
    "pixel_size_um": "detection resolution, µm/px",
    "background_radius_um": "µm; 0 = no background subtraction",
    "median_radius_um": "µm; 0 = no median filter",
    "sigma_um": "Gaussian smoothing, µm",
    "threshold": "nucleus detection threshold, OD",
    "min_area_um2": "smallest nucleus, µm²",
    "max_area_um2": "largest nucleus, µm²",
    "max_background": "OD; brighter background is not subtracted",
    "split_by_shape": "split touching nuclei by shape (watershed)",
    "cell_expansion_um": "µm beyond the nucleus; 0 = cell is the nucleus",
    "membrane_width_um": "µm, ring inside the cell boundary",
    "hematoxylin_threshold": "OD; > 0 with image = \"od_sum\": also add pale nuclei found on hematoxylin (0 = off)",
}
_SCORING_COMMENTS = {
    "compartment": "nucleus | cytoplasm | membrane | cell",
    "statistic": "DAB OD mean | max",
    "thresholds": "OD; one value: positive/negative only",
    "cells": "tumour | all: which cells the headline score uses",
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return f"{v:.1f}"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def _table(name: str, values: dict, comments: dict) -> list[str]:
    lines = [f"[{name}]"]
    width = max(len(f"{k} = {_toml_value(v)}") for k, v in values.items())
    for k, v in values.items():
        entry = f"{k} = {_toml_value(v)}"
        c = comments.get(k)
        lines.append(f"{entry:<{width}}  # {c}" if c else entry)
    return lines


def _to_toml(p: Preset) -> str:
    bg = [int(x) if float(x).is_integer() else x for x in p.stains.background]
    stains = {"estimate": p.stains.estimate, "hematoxylin": list(p.stains.hematoxylin),
              "dab": list(p.stains.dab), "background": bg}
    lines = [f"# ihcscore preset (written by ihcscore; every key optional, defaults in DESIGN.md)",
             f"name = {_toml_value(p.name)}", ""]
    lines += _table("stains", stains, _STAIN_COMMENTS) + [""]
    lines += _table("detection", dataclasses.asdict(p.detection), _DETECTION_COMMENTS) + [""]
    lines += _table("scoring", p.scoring.to_dict(), _SCORING_COMMENTS)
    return "\n".join(lines) + "\n"
