"""The "IHC score" dock widget: presets, stains, detection, thresholds, run, results, export.

Everything that detects, measures, classifies or scores is an engine call
(:func:`ihcscore.pipeline.analyze_region`, :func:`ihcscore.pipeline.analyze_slide`,
:func:`ihcscore.scoring.assign_bins`, :func:`ihcscore.scoring.summarize`,
:func:`ihcscore.stains.estimate_stain_vectors`, :func:`ihcscore.stains.deconvolve`,
:mod:`ihcscore.export`). The widget reads pixels, places results in the
viewer (µm) and keeps the cell table so thresholds can move without re-detection.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                            QGridLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QProgressBar, QPushButton,
                            QScrollArea, QSizePolicy, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ihcscore import classify as classify_mod
from ihcscore import export as export_mod
from ihcscore.cells import DetectionParams
from ihcscore.pipeline import analyze_slide, analyze_slide_region, read_detection_tile, slide_stains
from ihcscore.preset import DETECTION_IMAGES, available_presets, load_preset
from ihcscore.scoring import COMPARTMENTS, STATISTICS, ScoringScheme
from ihcscore.stains import StainVectors, deconvolve, estimate_stain_vectors

from ._core import (SCORE_COLUMNS, Region, RegionCells, ScoredCells, bbox_from_points, bin_rgba, first_copies,
                    format_value, label_color_dict, nearest_cells, placement, points_in_polygons, shape_area,
                    summary_rows, visible_corners)
from ._slides import layer_slide
from ._writer import KEPT_LABELS

__all__ = ["IHCScoreWidget", "DETECTION_FIELDS", "REGION_MODES", "Cancelled"]

#: Detection parameters shown in the widget: field, label, unit, min, max, step, decimals.
DETECTION_FIELDS = (
    ("pixel_size_um", "Pixel size", "µm/px", 0.05, 10.0, 0.05, 3),
    ("background_radius_um", "Background radius", "µm", 0.0, 100.0, 1.0, 2),
    ("median_radius_um", "Median radius", "µm", 0.0, 20.0, 0.5, 2),
    ("sigma_um", "Sigma", "µm", 0.1, 20.0, 0.1, 2),
    ("threshold", "Threshold", "OD", 0.0, 5.0, 0.01, 3),
    ("min_area_um2", "Min nucleus area", "µm²", 0.0, 10000.0, 1.0, 1),
    ("max_area_um2", "Max nucleus area", "µm²", 1.0, 100000.0, 10.0, 1),
    ("max_background", "Max background", "OD", 0.0, 10.0, 0.1, 2),
    ("cell_expansion_um", "Cell expansion", "µm", 0.0, 50.0, 0.5, 2),
    ("membrane_width_um", "Membrane width", "µm", 0.0, 10.0, 0.1, 2),
)
#: Where to score.
REGION_MODES = ("Selected annotations", "Visible field", "Whole slide")
#: Threshold slider range (OD) and step.
THRESHOLD_RANGE = (0.0, 2.5)
THRESHOLD_STEP = 0.005
#: A region read at level 0 may have at most this many pixels (use "Whole slide" beyond).
MAX_REGION_PIXELS = 300_000_000
#: Clicked tumour / non-tumour points snap to the nearest cell within this distance (µm).
CLASS_CLICK_RADIUS_UM = 15.0

RESULT_TAG = "ihcscore_result"
EXCLUDE_LAYER = "exclude"
TUMOUR_LAYER = "tumour"
OTHER_LAYER = "non-tumour"


class Cancelled(Exception):
    """Raised inside a run when the user pressed Cancel."""


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progress = Signal(int, int)


def _decimals(value: float, most: int = 17) -> int:
    """Fewest decimals (at most ``most``) that show ``value`` exactly."""
    for k in range(most + 1):
        if abs(round(value, k) - value) <= 1e-12 * max(1.0, abs(value)):
            return k
    return most


def _spin(unit: str, lo: float, hi: float, step: float, decimals: int, value: float) -> QDoubleSpinBox:
    w = QDoubleSpinBox()
    w.setRange(lo, hi)
    w.setSingleStep(step)
    w.setDecimals(decimals)
    w.setSuffix(f" {unit}")
    w.setValue(value)
    w.setKeyboardTracking(False)
    return w


def _image_matrix(layer) -> np.ndarray:
    """3×3 matrix taking a layer's (y, x, 1) data coordinates to world: scale, translate, rotate, shear and
    affine together."""
    try:
        m = np.asarray(layer._data_to_world.affine_matrix, dtype=np.float64)  # napari's composed transform
    except AttributeError:  # pragma: no cover - other napari versions: scale and translate only
        (sy, sx), (ty, tx) = layer.scale[-2:], layer.translate[-2:]
        return np.array([[sy, 0, ty], [0, sx, tx], [0, 0, 1.0]])
    out = np.eye(3)
    out[:2, :2] = m[-3:-1, -3:-1]
    out[:2, 2] = m[-3:-1, -1]
    return out


def _rotated(m: np.ndarray) -> bool:
    """Whether an :func:`_image_matrix` rotates or shears (slide axes not along the screen's)."""
    return not np.allclose(m[:2, :2], np.diag(np.diag(m[:2, :2])))


def _units(layer):
    """The (y, x) world units of ``layer`` (µm for a slide), for the layers placed over it."""
    return tuple(getattr(layer, "units", ("pixel", "pixel")))[-2:]


def _camera_and_canvas(viewer):
    """The 2D camera and the canvas size (h, w) in screen pixels, across napari versions."""
    scene = getattr(viewer, "scene", None)
    cam = getattr(scene, "camera", None) or viewer.camera
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None)
    if size is None:
        size = getattr(viewer, "_canvas_size", None)
    if size is None:
        size = viewer.window._qt_viewer.canvas.size
    return cam, tuple(int(v) for v in size)


class _Collapsible(QWidget):
    """A titled section that folds away (detection parameters)."""

    def __init__(self, title: str, content: QWidget, expanded: bool = False):
        super().__init__()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.toggle = QPushButton()
        self.toggle.setCheckable(True)
        self.toggle.setStyleSheet("text-align: left;")
        self._title = title
        self.content = content
        lay.addWidget(self.toggle)
        lay.addWidget(content)
        self.toggle.toggled.connect(self._set)
        self.toggle.setChecked(expanded)
        self._set(expanded)

    def _set(self, on: bool):
        self.content.setVisible(on)
        self.toggle.setText(("▼ " if on else "▶ ") + self._title)


class IHCScoreWidget(QWidget):
    """Dock widget that scores DAB IHC on a slide opened in napari.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer

    Notes
    -----
    Programmatic use (tests, scripts): set controls, then :meth:`run` with
    ``sync=True``; :attr:`result` holds the :class:`ScoredCells`,
    :attr:`summaries` the current scores, :meth:`set_thresholds` re-bins.
    """

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.result: ScoredCells | None = None
        self.summaries: dict = {}
        self.last_regions: list[Region] = []
        self.last_error: str | None = None
        self.worker = None
        self._cancel = threading.Event()
        self._stains: StainVectors | None = None  # None: the preset's stains
        self._stale = False  # detection settings changed since the result was computed
        self._custom_presets: dict = {}  # preset box entries that are not packaged presets
        self._exact_values: dict = {}  # the preset's detection values, beyond what the spin boxes keep
        self._preset = None
        self._layers: dict = {}
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)
        self._rescore_timer = QTimer(self)
        self._rescore_timer.setSingleShot(True)
        self._rescore_timer.setInterval(60)
        self._rescore_timer.timeout.connect(self.rescore)
        self._annot_timer = QTimer(self)
        self._annot_timer.setSingleShot(True)
        self._annot_timer.setInterval(300)
        self._annot_timer.timeout.connect(self.apply_annotations)
        self._build()
        self._load_preset(self.preset_combo.currentText())
        self._refresh_images()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)

    # ------------------------------------------------------------------ layout
    def _build(self):
        outer = QVBoxLayout(self)
        outer.setContentsMargins(2, 2, 2, 2)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        body = QWidget()
        lay = QVBoxLayout(body)
        scroll.setWidget(body)
        outer.addWidget(scroll)

        # image and preset
        top = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("RGB image layer (slide) to score")
        top.addRow("Slide", self.image_combo)
        prow = QHBoxLayout()
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(available_presets())
        if "cxcr4" in available_presets():
            self.preset_combo.setCurrentText("cxcr4")
        self.preset_combo.setToolTip("Marker preset: every stain, detection and scoring parameter")
        self.preset_combo.currentTextChanged.connect(self._load_preset)
        self.preset_load = QPushButton("TOML…")
        self.preset_load.setToolTip("Load a preset file (.toml)")
        self.preset_load.clicked.connect(self._load_preset_file)
        prow.addWidget(self.preset_combo, 1)
        prow.addWidget(self.preset_load)
        top.addRow("Preset", prow)
        lay.addLayout(top)

        # stains
        sbox = QGroupBox("Stain vectors (OD, R G B)")
        sl = QVBoxLayout(sbox)
        self.stain_label = QLabel()
        self.stain_label.setWordWrap(True)
        self.stain_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        sl.addWidget(self.stain_label)
        g = QGridLayout()
        self.stain_default = QPushButton("Preset / default")
        self.stain_estimate = QPushButton("Estimate from rectangle")
        self.stain_estimate.setToolTip("Estimate hematoxylin, DAB and background from the selected Shapes rectangle")
        self.stain_load = QPushButton("Load JSON…")
        self.stain_save = QPushButton("Save JSON…")
        self.preview_btn = QPushButton("Preview H / DAB (OD)")
        self.preview_btn.setToolTip("Add hematoxylin and DAB optical density images of the field on screen")
        for i, b in enumerate((self.stain_default, self.stain_estimate, self.stain_load, self.stain_save)):
            g.addWidget(b, i // 2, i % 2)
        g.addWidget(self.preview_btn, 2, 0, 1, 2)
        sl.addLayout(g)
        self.stain_default.clicked.connect(lambda: self.set_stains(None))
        self.stain_estimate.clicked.connect(self._guard(self.estimate_stains))
        self.stain_load.clicked.connect(self._load_stains)
        self.stain_save.clicked.connect(self._save_stains)
        self.preview_btn.clicked.connect(self._guard(self.preview))
        lay.addWidget(sbox)

        # detection (collapsible)
        det = QWidget()
        df = QFormLayout(det)
        df.setContentsMargins(8, 0, 0, 0)
        self.det_image = QComboBox()
        self.det_image.addItems(DETECTION_IMAGES)
        self.det_image.setToolTip("Detection image: hematoxylin OD, or the OD sum (finds DAB-stained nuclei)")
        df.addRow("Detection image", self.det_image)
        self.det_exclude_dab = QCheckBox("Exclude DAB from the detection image")
        df.addRow(self.det_exclude_dab)
        self.det_split = QCheckBox("Split touching nuclei by shape")
        df.addRow(self.det_split)
        self.det_spins: dict[str, QDoubleSpinBox] = {}
        defaults = DetectionParams()
        for name, label, unit, lo, hi, step, dec in DETECTION_FIELDS:
            w = _spin(unit, lo, hi, step, dec, getattr(defaults, name))
            self.det_spins[name] = w
            df.addRow(f"{label} ({unit})", w)
        for w in self.det_spins.values():
            w.valueChanged.connect(self._detection_changed)
        self.det_image.currentTextChanged.connect(self._detection_changed)
        self.det_exclude_dab.toggled.connect(self._detection_changed)
        self.det_split.toggled.connect(self._detection_changed)
        self.detection_section = _Collapsible("Detection parameters", det, expanded=False)
        lay.addWidget(self.detection_section)

        # scoring
        sc = QGroupBox("Scoring")
        sf = QFormLayout(sc)
        self.compartment = QComboBox()
        self.compartment.addItems(COMPARTMENTS)
        self.statistic = QComboBox()
        self.statistic.addItems(STATISTICS)
        self.cell_group = QComboBox()
        self.cell_group.addItems(("tumour", "all"))
        sf.addRow("Compartment", self.compartment)
        sf.addRow("DAB OD statistic", self.statistic)
        sf.addRow("Headline cells", self.cell_group)
        self.single_threshold = QCheckBox("Single threshold (positive / negative)")
        sf.addRow(self.single_threshold)
        from superqt import QLabeledDoubleSlider

        self.sliders = []
        for i, name in enumerate(("1+", "2+", "3+")):
            s = QLabeledDoubleSlider(Qt.Horizontal)
            s.setRange(*THRESHOLD_RANGE)
            s.setSingleStep(THRESHOLD_STEP)
            s.setDecimals(3)
            s.setValue((0.2, 0.4, 0.6)[i])
            s.setToolTip(f"DAB OD threshold of the {name} bin (OD units)")
            s.valueChanged.connect(lambda v, i=i: self._slider_moved(i))
            self.sliders.append(s)
            sf.addRow(f"{name} ≥ (OD)" if i else "Positive / 1+ ≥ (OD)", s)
        for w in (self.compartment, self.statistic, self.cell_group):
            w.currentTextChanged.connect(lambda _: self._schedule_rescore())
        self.single_threshold.toggled.connect(self._single_toggled)
        lay.addWidget(sc)

        # run
        rb = QGroupBox("Run")
        rl = QVBoxLayout(rb)
        rrow = QHBoxLayout()
        self.region_mode = QComboBox()
        self.region_mode.addItems(REGION_MODES)
        self.region_mode.setToolTip("Selected Shapes annotations (all shapes of the active Shapes layer when none "
                                    "is selected), the field on screen, or the whole slide (tiled, tissue only)")
        rrow.addWidget(QLabel("Region"))
        rrow.addWidget(self.region_mode, 1)
        rl.addLayout(rrow)
        brow = QHBoxLayout()
        self.run_btn = QPushButton("Run")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.run_btn.clicked.connect(lambda: self.run())
        self.cancel_btn.clicked.connect(self.cancel)
        brow.addWidget(self.run_btn)
        brow.addWidget(self.cancel_btn)
        rl.addLayout(brow)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        rl.addWidget(self.progress)
        self.status = QLabel("Open a slide, draw a rectangle (Shapes layer) and press Run.")
        self.status.setWordWrap(True)
        rl.addWidget(self.status)
        lay.addWidget(rb)

        # annotations: tumour / non-tumour / exclude
        ab = QGroupBox("Cell classes and exclusions")
        al = QGridLayout(ab)
        self.annot_btn = QPushButton("Add tumour / non-tumour / exclude layers")
        self.annot_btn.setToolTip("Click cells into the 'tumour' and 'non-tumour' Points layers; draw polygons in "
                                  "the 'exclude' Shapes layer to leave cells out")
        self.apply_annot_btn = QPushButton("Apply")
        self.reset_annot_btn = QPushButton("Reset classes")
        self.annot_btn.clicked.connect(self.add_annotation_layers)
        self.apply_annot_btn.clicked.connect(self._guard(self.apply_annotations))
        self.reset_annot_btn.clicked.connect(self.reset_classes)
        al.addWidget(self.annot_btn, 0, 0, 1, 2)
        al.addWidget(self.apply_annot_btn, 1, 0)
        al.addWidget(self.reset_annot_btn, 1, 1)
        lay.addWidget(ab)

        # results table
        self.table = QTableWidget(0, 3 + len(SCORE_COLUMNS))
        self.table.setHorizontalHeaderLabels(["Region", "Cells", "Compartment"] + [c for c, _ in SCORE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(160)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarAsNeeded)
        self.table.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        note = QLabel("Scores (* = scored compartment; H-score 0–300, % of scored cells, Allred 0–8, IRS 0–12)")
        note.setWordWrap(True)
        lay.addWidget(note)
        lay.addWidget(self.table)

        # histogram
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 2.2), dpi=90, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(170)
        self.hist_ax = self.figure.add_subplot(111)
        lay.addWidget(self.canvas)

        # export
        eb = QGroupBox("Export")
        el = QGridLayout(eb)
        self.export_buttons = {}
        for i, (key, text) in enumerate((("csv", "Cells CSV…"), ("parquet", "Cells Parquet…"),
                                         ("json", "Summary JSON…"), ("geojson", "GeoJSON (QuPath)…"))):
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, k=key: self._export_dialog(k))
            el.addWidget(b, i // 2, i % 2)
            self.export_buttons[key] = b
        lay.addWidget(eb)
        lay.addStretch(1)
        body.setMinimumWidth(360)
        self.setMinimumWidth(380)

    # ------------------------------------------------------------------ helpers
    def _guard(self, fn):
        """Run ``fn`` and show an engine ``ValueError`` as a napari notification."""

        def wrapped(*_):
            try:
                return fn()
            except (ValueError, RuntimeError, OSError) as e:
                self._error(str(e))

        return wrapped

    def _error(self, msg: str):
        from napari.utils.notifications import show_error

        self.last_error = msg
        self.status.setText(f"Error: {msg}")
        show_error(msg)

    def _info(self, msg: str):
        from napari.utils.notifications import show_info

        self.status.setText(msg)
        show_info(msg)

    def _refresh_images(self, *_):
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [lay.name for lay in self.viewer.layers if isinstance(lay, Image) and lay.rgb]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        elif names:
            with_path = [n for n in names if self.viewer.layers[n].metadata.get("ihcscore_path")]
            self.image_combo.setCurrentText((with_path or names)[-1])
        self.image_combo.blockSignals(False)

    def image_layer(self):
        """The RGB image layer being scored."""
        self._refresh_images()
        name = self.image_combo.currentText()
        if not name:
            raise ValueError("no RGB image layer: open a slide first (File > Open, or drag it onto napari)")
        return self.viewer.layers[name]

    def _world_to_level0(self, layer):
        """World (y, x) -> level-0 (y, x) of ``layer`` in the engine's convention (QuPath's: pixel ``k``
        spans ``[k, k + 1)``; napari centres it on ``k``)."""
        return lambda p: np.asarray(layer.world_to_data(np.asarray(p, float)))[-2:] + 0.5

    def _level0_to_world(self, layer, yx):
        """Level-0 (y, x) of ``layer`` (the engine's convention) -> world (y, x), through its whole
        transform (a moved or rotated slide too)."""
        yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2) - 0.5
        m = _image_matrix(layer)
        return yx @ m[:2, :2].T + m[:2, 2]

    def _grid_layer_kwargs(self, image, origin_px, downsample: float) -> dict:
        """Layer keywords that place a detection-grid image (first pixel at level-0 ``origin_px``,
        ``downsample`` level-0 px per pixel) over ``image``: scale and translate, or an affine when the
        slide is rotated or sheared."""
        m = _image_matrix(image)
        # all three keys every time: a layer placed again (preview) must lose the other placement's parts
        if not _rotated(m):
            translate, scale = placement(origin_px, downsample, np.diag(m[:2, :2]), m[:2, 2])
            return {"translate": translate, "scale": scale, "affine": np.eye(3)}
        (ty, tx), (sy, sx) = placement(origin_px, downsample, (1.0, 1.0))  # on the slide's own pixels
        grid = np.array([[sy, 0, ty], [0, sx, tx], [0, 0, 1.0]])
        return {"translate": (0.0, 0.0), "scale": (1.0, 1.0), "affine": m @ grid}

    # ------------------------------------------------------------------ preset
    def _load_preset(self, name_or_path):
        if not name_or_path:
            return
        if name_or_path in self._custom_presets:  # an entry a file or a script added
            self.set_preset(self._custom_presets[name_or_path])
            return
        try:
            p = load_preset(name_or_path)
        except ValueError as e:
            self._error(str(e))
            return
        self.set_preset(p)

    def _load_preset_file(self):
        path, _ = QFileDialog.getOpenFileName(self, "Load preset", "", "Preset (*.toml)")
        if path:
            self._load_preset(path)

    def set_preset(self, preset):
        """Show every parameter of ``preset`` in the controls.

        Cells detected with another preset are cleared: re-binning them with this preset's
        thresholds and compartment would mix two markers' settings.
        """
        if self.worker is not None:  # its cells would be shown with this preset's thresholds
            self.cancel()
        if self.result is not None:
            self.clear_result(f"Preset {preset.name}: press Run to detect and score with it.")
        self._preset = preset
        # The box names the preset in use: a packaged one by its name, any other (a TOML file, a script's)
        # by its name and where it came from, kept so that choosing it again gives it back.
        label = preset.name
        if preset.name not in available_presets() or preset != load_preset(preset.name):
            src = Path(str(preset.source or ""))
            label = f"{preset.name} ({src.name if src.is_file() else 'custom'})"
            self._custom_presets[label] = preset
        self.preset_combo.blockSignals(True)
        if self.preset_combo.findText(label) < 0:
            self.preset_combo.addItem(label)
        self.preset_combo.setCurrentText(label)
        self.preset_combo.blockSignals(False)
        d = preset.detection
        self.det_image.setCurrentText(d.image)
        self.det_exclude_dab.setChecked(bool(d.exclude_dab))
        self.det_split.setChecked(bool(d.split_by_shape))
        self._exact_values = {name: float(getattr(d, name)) for name in self.det_spins}
        for name, w in self.det_spins.items():
            v = float(getattr(d, name))
            w.setDecimals(max(w.decimals(), _decimals(v)))  # a preset's value is shown and used as written
            w.setRange(min(w.minimum(), v), max(w.maximum(), v))
            w.setValue(v)
        s = preset.scoring
        for w, v in ((self.compartment, s.compartment), (self.statistic, s.statistic), (self.cell_group, s.cells)):
            w.blockSignals(True)
            w.setCurrentText(v)
            w.blockSignals(False)
        self._set_slider_values(s.thresholds)
        self._stains = None
        self._show_stains()
        self._schedule_rescore()

    def _set_slider_values(self, thresholds):
        t = [float(v) for v in thresholds]
        single = len(t) == 1
        for s in self.sliders:
            s.blockSignals(True)
            # a preset's thresholds beyond the default range, or finer than its step, are kept as written
            if max(t) > s.maximum():
                s.setRange(s.minimum(), math.ceil(max(t) * 1.2 * 10) / 10)
            s.setDecimals(max(3, *(_decimals(v) for v in t)))
        if single:
            self.sliders[0].setValue(t[0])
        else:
            for s, v in zip(self.sliders, t):
                s.setValue(v)
        for s in self.sliders:
            s.blockSignals(False)
        self.single_threshold.blockSignals(True)
        self.single_threshold.setChecked(single)
        self.single_threshold.blockSignals(False)
        for s in self.sliders[1:]:
            s.setEnabled(not single)

    def thresholds(self) -> tuple[float, ...]:
        """Current thresholds (OD), 1 or 3 values."""
        vals = [round(float(s.value()), 6) for s in self.sliders]
        return (vals[0],) if self.single_threshold.isChecked() else tuple(vals)

    def scheme(self) -> ScoringScheme:
        """The scoring scheme the controls describe."""
        return ScoringScheme(compartment=self.compartment.currentText(), statistic=self.statistic.currentText(),
                             thresholds=self.thresholds(), cells=self.cell_group.currentText())

    def current_preset(self):
        """The selected preset with every control's value applied (engine ``Preset.replace``)."""
        # a control still showing the preset's value gives the value itself (a spin box keeps ~10 decimals)
        exact = dict(self._exact_values)
        det = {name: exact[name] if name in exact and abs(float(w.value()) - exact[name]) <= 10.0 ** -w.decimals()
               else float(w.value()) for name, w in self.det_spins.items()}
        det.update(image=self.det_image.currentText(), exclude_dab=self.det_exclude_dab.isChecked(),
                   split_by_shape=self.det_split.isChecked())
        s = self.scheme()
        kw = dict(thresholds=s.thresholds, compartment=s.compartment, statistic=s.statistic, cells=s.cells)
        if self._stains is not None:
            kw["stain_vectors"] = self._stains
        return self._preset.replace(**kw, **det)

    # ------------------------------------------------------------------ stains
    def stains(self) -> StainVectors:
        """Stain vectors a run will use (the preset's unless estimated or loaded)."""
        return self._stains if self._stains is not None else self._preset.stains.to_stain_vectors()

    def set_stains(self, stains: StainVectors | None):
        """Use ``stains`` (None: the preset's vectors)."""
        self._stains = stains
        self._show_stains()
        self._detection_changed()

    def _detection_changed(self, *_):
        """Say once that the cells shown were detected with the earlier settings."""
        if self.result is None or self._stale or self.worker is not None:
            return
        self._stale = True
        self._info("Detection settings changed: the cells shown were found with the earlier ones "
                   "(scores re-bin, detection does not); press Run to apply them.")

    def clear_result(self, message: str = ""):
        """Drop the result, its layers, table and histogram."""
        self._rescore_timer.stop()
        self.result = None
        self.summaries = {}
        self._stale = False
        self._remove_result_layers()
        self.table.setRowCount(0)
        self.hist_ax.clear()
        self.canvas.draw_idle()
        if message:
            self.status.setText(message)

    def _show_stains(self):
        sv = self.stains()
        est = " (estimated from the slide at run time)" if self._stains is None and self._preset.stains.estimate else ""

        def v(x):
            return " ".join(f"{c:.3f}" for c in x)

        src = sv.name if self._stains is not None else f"preset {self._preset.name}"
        self.stain_label.setText(f"<b>{src}</b>{est}<br>Hematoxylin: {v(sv.hematoxylin)}<br>DAB: {v(sv.dab)}"
                                 f"<br>Background RGB: {v(sv.background)}")

    def _selected_shapes(self, allow_all: bool = True):
        """(layer, [indices]) of the annotation shapes to use."""
        from napari.layers import Shapes

        active = self.viewer.layers.selection.active
        cands = [active] if isinstance(active, Shapes) and active.name != EXCLUDE_LAYER else []
        cands += [lay for lay in self.viewer.layers if isinstance(lay, Shapes) and lay.name != EXCLUDE_LAYER
                  and lay not in cands and not lay.metadata.get(RESULT_TAG)]
        for lay in cands:
            if len(lay.data) == 0:
                continue
            sel = sorted(lay.selected_data)
            if sel:
                return lay, sel
            if allow_all:
                return lay, list(range(len(lay.data)))
        raise ValueError("no annotation: draw a rectangle or polygon in a Shapes layer (and select it)")

    def _shape_level0(self, shapes_layer, image_layer, index) -> np.ndarray:
        """(K, 2) level-0 (x, y) vertices of one shape.

        napari keeps vertices in float32 (µm): a corner drawn on a pixel edge (or centre) comes back off it by up
        to a few float32 steps, which moves a centroid lying on that edge in or out; such vertices are put back.
        """
        verts = np.asarray(shapes_layer.data[index], dtype=np.float64)[:, -2:]
        world = np.array([shapes_layer.data_to_world(v) for v in verts])[:, -2:]
        to0 = self._world_to_level0(image_layer)
        xy = np.array([to0(w) for w in world])[:, ::-1]
        um_per_px = float(np.abs(np.linalg.svd(_image_matrix(image_layer)[:2, :2], compute_uv=False)).min())
        steps = 4 * np.spacing(np.abs(world[:, ::-1]).astype(np.float32)).astype(np.float64) / um_per_px
        halves = np.round(xy * 2) / 2
        return np.where(np.abs(xy - halves) < np.maximum(1e-3, steps), halves, xy)

    def estimate_stains(self):
        """Estimate stain vectors and background from the selected Shapes rectangle (engine estimate)."""
        image = self.image_layer()
        slide = layer_slide(image)
        layer, idx = self._selected_shapes()
        xy = self._shape_level0(layer, image, idx[0])
        x, y, w, h = bbox_from_points(xy, slide.dimensions)
        if w < 8 or h < 8:
            raise ValueError("the rectangle is empty or outside the slide")
        ds = max(1.0, max(w, h) / 4000.0)
        rgb = slide.read_scaled(x, y, w, h, ds) if ds > 1 else slide.read_region((x, y), 0, (w, h))
        sv = estimate_stain_vectors(rgb)
        self.set_stains(dataclasses.replace(sv, name=f"estimated from {layer.name} #{idx[0] + 1}"))
        self._info(f"stain vectors estimated from a {w}×{h} px rectangle")
        return sv

    def _load_stains(self):
        path, _ = QFileDialog.getOpenFileName(self, "Load stain vectors", "", "Stain vectors (*.json)")
        if path:
            try:
                self.set_stains(StainVectors.from_json(path))
            except ValueError as e:
                self._error(str(e))

    def _save_stains(self):
        path, _ = QFileDialog.getSaveFileName(self, "Save stain vectors", "stains.json", "Stain vectors (*.json)")
        if path:
            try:
                used = self.result.stains if self._stains is None and self.result is not None else None
                (used or self.stains()).to_json(path)  # an estimating preset: the vectors the run used
                self._info(f"wrote {path}")
            except (ValueError, OSError) as e:
                self._error(f"{path}: cannot write ({e.strerror or e})" if isinstance(e, OSError) else str(e))

    def visible_region(self, image) -> Region:
        """Level-0 rectangle of the field on screen."""
        slide = layer_slide(image)
        cam, canvas_hw = _camera_and_canvas(self.viewer)
        corners = visible_corners(cam.center, cam.zoom, canvas_hw, self._world_to_level0(image))
        x, y, w, h = bbox_from_points(corners, slide.dimensions)
        if w < 1 or h < 1:
            raise ValueError("the slide is not on screen")
        # a rotated slide: the screen is not a box of the slide, its cells are those inside the screen
        return Region("visible field", x, y, w, h, corners if _rotated(_image_matrix(image)) else None)

    def preview(self, max_side: int = 2048):
        """Add hematoxylin and DAB OD images (engine deconvolution) of the field on screen."""
        image = self.image_layer()
        slide = layer_slide(image)
        r = self.visible_region(image)
        ds = max(1.0, max(r.w, r.h) / float(max_side))
        if ds > 1:
            # on a grid of ds level-0 px per pixel, read as the engine reads tiles: placed exactly where it lies
            gx0, gy0 = math.floor(r.x / ds), math.floor(r.y / ds)
            gx1, gy1 = math.ceil((r.x + r.w) / ds), math.ceil((r.y + r.h) / ds)
            rgb = read_detection_tile(slide, (gy0, gx0, gy1, gx1), ds)
            origin = (gx0 * ds, gy0 * ds)
        else:
            rgb, origin = slide.read_region((r.x, r.y), 0, (r.w, r.h)), (r.x, r.y)
        od = deconvolve(rgb, self.stains())
        where = self._grid_layer_kwargs(image, origin, ds)
        out = []
        for c, (name, cmap) in enumerate((("Hematoxylin OD", "I Blue"), ("DAB OD", "I Orange"))):
            data = np.clip(od[..., c], 0, None)
            if name in self.viewer.layers:
                lay = self.viewer.layers[name]
                lay.data = data
                for key, value in where.items():
                    setattr(lay, key, value)
            else:
                lay = self.viewer.add_image(data, name=name, colormap=cmap, contrast_limits=(0.0, 1.5),
                                            **where, blending="translucent",
                                            units=_units(image),
                                            metadata={"unit": "OD", RESULT_TAG: "preview"}, visible=True)
            out.append(lay)
        if image in self.viewer.layers:  # it may have been closed meanwhile
            self.viewer.layers.selection.active = image
        return out

    # ------------------------------------------------------------------ run
    def regions(self, image=None) -> list[Region]:
        """Regions the current mode selects (level-0 pixel rectangles)."""
        image = image or self.image_layer()
        slide = layer_slide(image)
        mode = self.region_mode.currentText()
        if mode == "Visible field":
            return [self.visible_region(image)]
        if mode == "Whole slide":
            w, h = slide.dimensions
            return [Region("whole slide", 0, 0, int(w), int(h))]
        layer, idx = self._selected_shapes()
        out, lines = [], []
        for i in idx:
            xy = shape_area(layer.shape_type[i], self._shape_level0(layer, image, i))
            if xy is None:  # no area to score
                lines.append(f"{layer.name} #{i + 1}")
                continue
            x, y, w, h = bbox_from_points(xy, slide.dimensions)
            if w < 1 or h < 1:
                # thinner than a pixel along an axis: read the pixels it lies in along that axis
                (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
                W, H = slide.dimensions
                if x1 < 0 or x0 >= W or y1 < 0 or y0 >= H:
                    continue  # off the slide
                if w < 1:
                    x, w = int(np.clip(np.floor((x0 + x1) / 2), 0, W - 1)), 1
                if h < 1:
                    y, h = int(np.clip(np.floor((y0 + y1) / 2), 0, H - 1)), 1
            # cells count when their centroid is inside the shape, as with --tissue ANNOTATIONS.geojson
            out.append(Region(f"{layer.name} #{i + 1}", x, y, w, h, xy))
        if not out and lines:
            raise ValueError(f"{', '.join(lines)}: a line has no area to score; draw a rectangle, ellipse or polygon")
        if not out:
            raise ValueError("the selected annotations lie outside the slide")
        return out

    def _job(self, slide, preset, stains, regions, whole: bool):
        """Work done off the GUI thread: engine calls only. Returns a ScoredCells."""
        import pandas as pd

        cancel, relay = self._cancel, self._relay

        def progress(done, total):
            if cancel.is_set():
                raise Cancelled()
            relay.progress.emit(int(done), int(total))

        if whole and getattr(slide, "path", None) is not None:
            # outlines too: the GeoJSON export writes the cells' own shapes
            res = analyze_slide(slide, preset, stains=stains, tissue="auto", progress=progress, polygons=True)
            cells = res.cells.copy()
            cells["region"] = 0
            return ScoredCells(cells=cells, regions=[Region("whole slide", 0, 0, *slide.dimensions)],
                               mpp=float(slide.mpp), stains=res.stains, preset=preset, kind="slide",
                               slide_summary=res.summary, warnings=list(res.summary.get("warnings", [])))
        parts, kept, warnings = [], [], []
        progress(0, len(regions))
        if stains is None and preset.stains.estimate:
            # once for the slide, from tissue windows meeting the regions, as `ihcscore score --tissue
            # ANNOTATIONS.geojson` estimates them: every region deconvolved alike
            import shapely

            shapes = [(r.name, shapely.Polygon(r.polygon) if r.polygon is not None else
                       shapely.box(r.x, r.y, r.x + r.w, r.y + r.h)) for r in regions]
            stains, warnings = slide_stains(slide, preset, annotations=shapes)
        for i, r in enumerate(regions):
            if r.w * r.h > MAX_REGION_PIXELS:
                raise ValueError(f"{r.name} is {r.w}×{r.h} px at full resolution: too large to read at once; "
                                 "use Region = Whole slide (tiled)")
            # read on the slide's grid with the tile context: the cells the CLI finds for this shape
            res = analyze_slide_region(slide, (r.x, r.y, r.w, r.h), preset, stains=stains, polygon=r.polygon)
            cells = res.cells.copy()
            cells["region"] = i
            parts.append(cells)
            seg = res.segmentation
            kept.append(RegionCells(r, seg.nuclei if seg is not None else None, seg.cells if seg is not None else None,
                                    float(res.downsample), float(res.pixel_size_um), tuple(res.origin_px)))
            stains = res.stains
            warnings += [w for w in res.summary.get("warnings", []) if w not in warnings]
            progress(i + 1, len(regions))
        cells = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if len(cells) and "object_id" not in cells.columns:  # 1, 2, ... per row, regions in turn (label is per region)
            cells.insert(0, "object_id", np.arange(1, len(cells) + 1))
        first = first_copies(cells[["x_px", "y_px"]].to_numpy(), cells["region"].to_numpy()) if len(cells) else None
        return ScoredCells(cells=cells, regions=kept, mpp=float(slide.mpp), stains=stains, preset=preset,
                           kind="regions", first=first, warnings=warnings)

    def run(self, sync: bool = False):
        """Score the chosen region(s).

        Parameters
        ----------
        sync : bool
            Run in the calling thread (tests, scripts). Otherwise a napari
            ``thread_worker`` runs the engine and the GUI stays responsive.

        Returns
        -------
        ScoredCells or worker
        """
        if self.worker is not None:
            self._info("a run is already in progress")
            return None
        self.last_error = None
        try:
            image = self.image_layer()
            slide = layer_slide(image)
            preset = self.current_preset()
            whole = self.region_mode.currentText() == "Whole slide"
            regions = self.regions(image)
        except ValueError as e:
            self._error(str(e))
            return None
        self.last_regions = regions
        self._run_image = image  # the result's slide once it arrives (the box may change meanwhile)
        self._run_settings = (preset.detection, self._stains)
        self._cancel.clear()
        self.progress.setRange(0, 0)  # busy until the first progress report
        self.status.setText(f"Scoring {len(regions)} region(s) of {image.name}…" if not whole
                            else f"Scoring the whole slide {image.name} (tiled)…")
        self._t0 = time.perf_counter()
        args = (slide, preset, self._stains, regions, whole)
        if sync:
            try:
                result = self._job(*args)
            except Exception as e:  # noqa: BLE001 - shown to the user
                self._on_error(e)
                self._on_finished()
                return None
            self._on_result(result)
            self._on_finished()
            return result
        from napari.qt.threading import create_worker

        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        worker = create_worker(self._job, *args, _start_thread=False, _ignore_errors=True)  # errored -> _on_error
        worker.returned.connect(self._on_result)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()
        return worker

    def cancel(self):
        """Stop the run at the next region or tile."""
        self._cancel.set()
        self.status.setText("Cancelling… (whole slide: at the next tile; annotations: after the region "
                            "being scored)")

    def _on_progress(self, done: int, total: int):
        if total <= 0:
            return
        if total == 1 and done == 0:
            self.progress.setRange(0, 0)
            return
        self.progress.setRange(0, total)
        self.progress.setValue(done)

    def _on_error(self, exc):
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        if isinstance(exc, Cancelled):
            self.last_error = "cancelled"
            self.status.setText("Cancelled.")
            return
        self._error(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))

    def _on_finished(self):
        self.worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _on_result(self, result: ScoredCells):
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.result = result
        self._image = self._run_image
        # detection settings changed while it ran: the cells shown were found with the earlier ones
        self._stale = (self.current_preset().detection, self._stains) != self._run_settings
        self._show_layers()
        self.rescore()
        if self._has_annotations():  # drawn classes and exclusions apply to the new cells too
            self.apply_annotations()
        dt = time.perf_counter() - self._t0
        n = int(result.shown.sum() + (result.excluded & ~result.duplicate).sum())  # each cell once
        text = f"{n} cells in {len(result.regions)} region(s), {dt:.1f} s"
        if result.warnings:
            from napari.utils.notifications import show_warning

            for w in result.warnings:  # e.g. an H&E slide: its DAB scores would be meaningless
                show_warning(w)
            text += "\nWarning: " + "\nWarning: ".join(result.warnings)
        if self._stale:
            text += "\nDetection settings changed during the run: press Run to apply them."
        self.status.setText(text)

    def _has_annotations(self) -> bool:
        return any(name in self.viewer.layers and len(self.viewer.layers[name].data)
                   for name in (TUMOUR_LAYER, OTHER_LAYER, EXCLUDE_LAYER))

    # ------------------------------------------------------------------ result layers
    def _remove_result_layers(self):
        for lay in list(self.viewer.layers):
            if lay.metadata.get(RESULT_TAG) in ("cells", "points"):
                self.viewer.layers.remove(lay)
        self._layers = {}

    def _show_layers(self):
        from napari.utils.colormaps import DirectLabelColormap

        image = self._image
        res = self.result
        self._remove_result_layers()
        labels_layers = []
        if res.kind == "regions":
            for i, rc in enumerate(res.regions):
                if rc.cells is None:
                    continue
                name = "cells" if len(res.regions) == 1 else f"cells {rc.region.name}"
                where = self._grid_layer_kwargs(image, rc.origin, rc.downsample)
                lay = self.viewer.add_labels(rc.cells, name=name, **where, opacity=0.55,
                                             units=_units(image),
                                             colormap=DirectLabelColormap(color_dict={None: np.zeros(4)}),
                                             metadata={RESULT_TAG: "cells", "region": i,
                                                       "units": "µm", "pixel_size_um": rc.pixel_size_um})
                labels_layers.append(lay)
        cells = res.cells
        yx = self._level0_to_world(image, cells[["y_px", "x_px"]].to_numpy()) if len(cells) else np.zeros((0, 2))
        features = cells.drop(columns=[c for c in export_mod.GEOMETRY_COLUMNS if c in cells.columns])
        pts = self.viewer.add_points(yx, name="cell centroids", size=3.0, features=features.reset_index(drop=True),
                                     units=_units(image),
                                     border_width=0.15, border_width_is_relative=True,
                                     metadata={RESULT_TAG: "points", "units": "µm"})
        self._layers = {"labels": labels_layers, "points": pts}
        if image in self.viewer.layers:  # it may have been closed meanwhile
            self.viewer.layers.selection.active = image

    def _recolour(self):
        res = self.result
        if res is None or not self._layers:
            return
        nt = len(self.scheme().thresholds)
        bins = res.cells["bin"].to_numpy() if len(res.cells) else np.zeros(0, int)
        shown = res.shown
        pts = self._layers.get("points")
        if pts is not None and pts in self.viewer.layers and len(pts.data) != len(res.cells):
            self._show_layers()  # points deleted or added by hand: put the cells back as they are
            pts = self._layers.get("points")
        if pts is not None and pts in self.viewer.layers:
            if len(res.cells):
                pts.features = res.cells.drop(
                    columns=[c for c in export_mod.GEOMETRY_COLUMNS if c in res.cells.columns]).reset_index(drop=True)
                pts.face_color = bin_rgba(bins, nt)
                tumour = res.cells["class"].to_numpy() == "tumour"
                pts.border_color = np.where(tumour[:, None], [[0, 0, 0, 1]], [[1, 1, 1, 1]]).astype(np.float32)
                pts.shown = shown
            pts.refresh()
        from napari.utils.colormaps import DirectLabelColormap

        for lay in self._layers.get("labels", []):
            if lay not in self.viewer.layers:
                continue
            i = lay.metadata["region"]
            sel = res.cells["region"].to_numpy() == i
            sub = res.cells[sel]
            lay.colormap = DirectLabelColormap(
                color_dict=label_color_dict(sub["label"].to_numpy(), bins[sel], nt, shown[sel]))
            # what File > Save writes: this region's cells that count (not the context's, not excluded ones)
            lay.metadata[KEPT_LABELS] = sub["label"].to_numpy()[~res.excluded[sel]].tolist()

    # ------------------------------------------------------------------ thresholds
    def _single_toggled(self, on: bool):
        for s in self.sliders[1:]:
            s.setEnabled(not on)
        self._schedule_rescore()

    def _slider_moved(self, i: int):
        """Keep t1 < t2 < t3 by pushing the neighbours, then re-score."""
        vals = [float(s.value()) for s in self.sliders]
        step = 0.01
        if not self.single_threshold.isChecked():  # leave room for the thresholds above and below it
            vals[i] = min(max(vals[i], THRESHOLD_RANGE[0] + step * i), self.sliders[i].maximum() - step * (2 - i))
            if abs(float(self.sliders[i].value()) - vals[i]) > 1e-9:
                self.sliders[i].blockSignals(True)
                self.sliders[i].setValue(vals[i])
                self.sliders[i].blockSignals(False)
        for j in range(i + 1, 3):
            if vals[j] <= vals[j - 1]:
                vals[j] = min(self.sliders[j].maximum(), vals[j - 1] + step)
        for j in range(i - 1, -1, -1):
            if vals[j] >= vals[j + 1]:
                vals[j] = max(THRESHOLD_RANGE[0], vals[j + 1] - step)
        for j, s in enumerate(self.sliders):
            if j != i and abs(float(s.value()) - vals[j]) > 1e-9:
                s.blockSignals(True)
                s.setValue(vals[j])
                s.blockSignals(False)
        self._schedule_rescore()

    def set_thresholds(self, thresholds):
        """Set the threshold sliders (OD; 1 or 3 values) and re-score at once."""
        self._set_slider_values(thresholds)
        return self.rescore()

    def _schedule_rescore(self):
        if self.result is not None:
            self._rescore_timer.start()

    def rescore(self):
        """Re-bin and re-summarise the existing cell table (no re-detection); update layers, table, histogram."""
        self._rescore_timer.stop()
        if self.result is None:
            return None
        try:
            scheme = self.scheme()
            self.summaries = self.result.rescore(scheme)
        except ValueError as e:
            self._error(str(e))
            return None
        self._recolour()
        self._fill_table(scheme)
        self._draw_histogram(scheme)
        return self.summaries

    def _fill_table(self, scheme):
        rows = summary_rows(self.summaries, scheme)
        self.table.setRowCount(len(rows))
        for r, (scope, group, comp, counts) in enumerate(rows):
            for c, text in enumerate((scope, group, comp)):
                self.table.setItem(r, c, QTableWidgetItem(text))
            for c, (_, key) in enumerate(SCORE_COLUMNS, start=3):
                v = counts.get(key)
                item = QTableWidgetItem(format_value(v))
                item.setData(Qt.UserRole, v)
                item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                self.table.setItem(r, c, item)

    def table_value(self, scope: str, group: str, compartment: str, key: str):
        """The raw value behind a table cell (tests; ``key`` as in the engine's summary)."""
        col = 3 + [k for _, k in SCORE_COLUMNS].index(key)
        for r in range(self.table.rowCount()):
            comp = self.table.item(r, 2).text().rstrip(" *")
            if (self.table.item(r, 0).text(), self.table.item(r, 1).text(), comp) == (scope, group, compartment):
                return self.table.item(r, col).data(Qt.UserRole)
        raise KeyError((scope, group, compartment))

    def _draw_histogram(self, scheme):
        ax = self.hist_ax
        ax.clear()
        cells = self.result.included
        col = scheme.measurement
        if len(cells) and col in cells.columns:
            v = cells[col].to_numpy(dtype=np.float64)
            hi = max(float(np.nanmax(v)) if np.isfinite(v).any() else 1.0, scheme.thresholds[-1] * 1.2, 0.1)
            bins = np.linspace(0, hi, 60)
            ax.hist(v[np.isfinite(v)], bins=bins, color="0.7", label="all cells")
            tum = cells["class"].to_numpy() == "tumour"
            ax.hist(v[tum & np.isfinite(v)], bins=bins, histtype="step", color="k", lw=1.2, label="tumour")
        nt = len(scheme.thresholds)
        for t, c in zip(scheme.thresholds, bin_rgba(np.arange(1, nt + 1), nt)):
            ax.axvline(t, color=c[:3], lw=1.5)
        ax.set_xlabel(f"{col} (OD)", fontsize=8)
        ax.set_ylabel("cells", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(cells):
            ax.legend(fontsize=7, frameon=False)
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ classes and exclusions
    def add_annotation_layers(self):
        """Add the 'tumour' and 'non-tumour' Points layers and the 'exclude' Shapes layer (µm)."""
        made = []
        try:
            units = {"units": _units(self.image_layer())}  # the slide's (µm): one unit across the layers
        except ValueError:
            units = {}
        if TUMOUR_LAYER not in self.viewer.layers:
            made.append(self.viewer.add_points(name=TUMOUR_LAYER, face_color="red", size=6.0, ndim=2, **units))
        if OTHER_LAYER not in self.viewer.layers:
            made.append(self.viewer.add_points(name=OTHER_LAYER, face_color="lime", size=6.0, ndim=2, **units))
        if EXCLUDE_LAYER not in self.viewer.layers:
            made.append(self.viewer.add_shapes(name=EXCLUDE_LAYER, face_color=[0, 0, 0, 0.25], edge_color="black",
                                               ndim=2, **units))
        for lay in made:
            lay.events.data.connect(lambda *_: self._annot_timer.start())
        return made

    def _world_points(self, name):
        if name not in self.viewer.layers or len(self.viewer.layers[name].data) == 0:
            return np.zeros((0, 2))
        lay = self.viewer.layers[name]
        return np.array([lay.data_to_world(p) for p in np.asarray(lay.data)])[:, -2:]

    def apply_annotations(self):
        """Apply clicked classes and exclusion polygons, then re-score.

        Classes: with ``ihcscore.classify.train_classifier`` (when the engine
        has it) a classifier is trained on the clicked cells and applied to
        all; otherwise the clicked cells' classes are overridden.
        """
        res = self.result
        if res is None or not len(res.cells):
            return None
        image = self._image
        world = self._level0_to_world(image, res.cells[["y_px", "x_px"]].to_numpy())
        # Each cell once (overlapping regions repeat the cells they share): clicks, training and
        # prediction work on the first copies; every copy then takes its first copy's class.
        uniq = res.unique_rows
        table = res.cells.iloc[uniq]
        classes = res.auto_class[uniq].copy()
        tum = self._world_points(TUMOUR_LAYER)
        oth = self._world_points(OTHER_LAYER)
        radius = CLASS_CLICK_RADIUS_UM
        i_t = nearest_cells(world[uniq], tum, radius)
        i_o = nearest_cells(world[uniq], oth, radius)
        i_t, i_o = i_t[i_t >= 0], i_o[i_o >= 0]
        method = "none"
        if len(i_t) or len(i_o):
            # Every cell goes in (unclicked ones labelled None): neighbourhood features need the whole table.
            labels = np.full(len(table), None, dtype=object)
            labels[i_t] = "tumour"
            labels[i_o] = "other"
            done = False
            if len(i_t) and len(i_o):
                try:
                    model = classify_mod.train_classifier(table, labels)
                    classes = np.asarray(model.predict(table), dtype=object)
                    method = "classifier"
                    done = True
                except Exception as e:  # noqa: BLE001 - fall back to overrides
                    from napari.utils.notifications import show_warning

                    show_warning(f"train_classifier failed ({e}); overriding the clicked cells only")
            if not done:
                method = "override"
            classes[i_t] = "tumour"
            classes[i_o] = "other"
        res.cells["class"] = classes[np.searchsorted(uniq, res.first)]
        excl = np.zeros(len(res.cells), bool)
        if EXCLUDE_LAYER in self.viewer.layers:
            lay = self.viewer.layers[EXCLUDE_LAYER]
            polys = [shape_area(kind, np.array([lay.data_to_world(v) for v in np.asarray(p)])[:, -2:][:, ::-1])
                     for p, kind in zip(lay.data, lay.shape_type)]
            polys = [p for p in polys if p is not None]  # lines have no area
            if polys:
                excl = points_in_polygons(world[:, 1], world[:, 0], polys)
        res.excluded = excl
        self.rescore()
        n_excluded = int((excl & ~res.duplicate).sum())
        self.status.setText(f"classes: {len(i_t)} tumour / {len(i_o)} non-tumour clicks ({method}); "
                            f"{n_excluded} cells excluded")
        return {"method": method, "n_tumour_clicks": len(i_t), "n_other_clicks": len(i_o),
                "n_excluded": n_excluded}

    def reset_classes(self):
        """Back to the engine's classes, nothing excluded."""
        if self.result is None:
            return
        self.result.cells["class"] = self.result.auto_class.copy()
        self.result.excluded = np.zeros(len(self.result.cells), bool)
        self.rescore()

    # ------------------------------------------------------------------ export
    def _export_cells(self):
        cells = self.result.included.drop(columns=["region"], errors="ignore")
        return cells.reset_index(drop=True)

    def export(self, kind: str, path) -> Path:
        """Write results with :mod:`ihcscore.export`.

        Parameters
        ----------
        kind : {"csv", "parquet", "json", "geojson"}
            Cell table (CSV / Parquet), summary JSON, or QuPath GeoJSON.
        path : str or Path
        """
        if self.result is None:
            raise ValueError("nothing to export: run the scoring first")
        path = Path(path)
        scheme = self.scheme()
        if kind == "csv":
            return export_mod.write_cells_csv(path, self._export_cells())
        if kind == "parquet":
            return export_mod.write_cells_parquet(path, self._export_cells())
        if kind == "json":
            return export_mod.write_summary_json(path, self.summary_document())
        if kind == "geojson":
            cells = self._export_cells()
            if self.result.kind == "regions":
                cells = self._with_polygons(cells)
            return export_mod.write_cells_geojson(path, cells, self.result.mpp, n_thresholds=len(scheme.thresholds))
        raise ValueError(f"unknown export kind {kind!r}")

    def _with_polygons(self, cells):
        """Nucleus and cell outlines (engine ``measure.label_polygons``) for GeoJSON."""
        from ihcscore.measure import label_polygons

        res = self.result
        inc = res.included.reset_index(drop=True)
        nuc, cel = [None] * len(inc), [None] * len(inc)
        for i, rc in enumerate(res.regions):
            sel = np.flatnonzero(inc["region"].to_numpy() == i)
            if rc.nuclei is None or not len(sel):
                continue
            ids = inc["label"].to_numpy()[sel]
            pn = label_polygons(rc.nuclei, ids, origin_px=rc.origin, downsample=rc.downsample, smooth=True)
            pc = label_polygons(rc.cells, ids, origin_px=rc.origin, downsample=rc.downsample, smooth=True)
            for k, lab in zip(sel, ids):
                nuc[k], cel[k] = pn.get(int(lab)), pc.get(int(lab))
        cells = cells.copy()
        cells["nucleus_polygon"] = nuc
        cells["cell_polygon"] = cel
        return cells

    def summary_document(self) -> dict:
        """What ``Summary JSON`` writes: the scores plus every parameter that produced them."""
        res = self.result
        scheme = self.scheme()
        image = self._image
        doc = {
            "slide": image.name,
            "path": image.metadata.get("ihcscore_path"),
            "mpp": res.mpp,
            "preset": res.preset.name,
            "preset_parameters": res.preset.replace(thresholds=scheme.thresholds, compartment=scheme.compartment,
                                                    statistic=scheme.statistic, cells=scheme.cells).to_dict(),
            "stain_vectors": res.stains.to_dict() if res.stains is not None else None,
            "thresholds": list(scheme.thresholds),
            "compartment": scheme.compartment,
            "statistic": scheme.statistic,
            "measurement": scheme.measurement,
            "scored_cells": scheme.cells,
            "n_cells": int(len(res.included)),
            "n_excluded": int((res.excluded & ~res.duplicate).sum()),
            "n_class_overrides": int((res.cells["class"].to_numpy() != res.auto_class)[res.unique_rows].sum()),
            "regions": [{"name": (rc.region if hasattr(rc, "region") else rc).name,
                         "x_px": (rc.region if hasattr(rc, "region") else rc).x,
                         "y_px": (rc.region if hasattr(rc, "region") else rc).y,
                         "w_px": (rc.region if hasattr(rc, "region") else rc).w,
                         "h_px": (rc.region if hasattr(rc, "region") else rc).h} for rc in res.regions],
        }
        head = self.summaries.get("all regions") or {}
        doc["tumour"], doc["all"] = head.get("tumour"), head.get("all")
        doc["by_region"] = {k: v for k, v in self.summaries.items() if k != "all regions"}
        doc["warnings"] = list(res.warnings)
        from ihcscore import __version__

        doc["software_version"] = __version__
        return doc

    def _export_dialog(self, kind):
        if self.result is None:
            self._error("nothing to export: run the scoring first")
            return
        name = {"csv": "cells.csv", "parquet": "cells.parquet", "json": "summary.json",
                "geojson": "cells.geojson"}[kind]
        flt = {"csv": "CSV (*.csv)", "parquet": "Parquet (*.parquet)", "json": "JSON (*.json)",
               "geojson": "GeoJSON (*.geojson *.json)"}[kind]
        path, _ = QFileDialog.getSaveFileName(self, "Export", name, flt)
        if path:
            try:
                self._info(f"wrote {self.export(kind, path)}")
            except (ValueError, OSError) as e:
                self._error(str(e))
