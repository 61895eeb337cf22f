"""Self-contained HTML reports: one per slide and a cohort index.

The pages open offline: figures are drawn with matplotlib's Agg canvas (no
pyplot, no global backend change) and embedded as base64 PNG; the only
script is a few lines of inline vanilla JavaScript that sort tables when a
column header is clicked (or focused and Enter pressed). No external CSS,
fonts or scripts.

Colours are QuPath's intensity class colours (:data:`ihcscore.export.BIN_COLORS`):
negative blue, 1+ yellow, 2+ orange, 3+ red.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_open
from .export import BIN_COLORS, to_jsonable

__all__ = [
    "scoring_measurement",
    "bin_color",
    "slide_report_html",
    "cohort_index_html",
    "report_href",
    "write_slide_report",
    "write_cohort_index",
]

COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")
UNSCORED_COLOR = (150, 150, 150)
_MISSING = "–"

# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #
_CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d0d4d9; --head:#eef1f5; --accent:#3558a8; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); margin: 0 auto; padding: 1.2rem 1.6rem 3rem; max-width: 1200px; line-height: 1.4; }
h1 { font-size: 1.55rem; margin: 0 0 .2rem; }
h2 { font-size: 1.15rem; margin: 1.8rem 0 .6rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
.sub { color: var(--muted); margin: 0 0 1rem; }
.warnings { border: 2px solid #c62828; background: #fdecea; color: #8e1b1b; padding: .6rem 1rem;
            border-radius: 6px; margin: 1rem 0; }
.warnings strong { display: block; margin-bottom: .2rem; }
.warnings ul { margin: .2rem 0 0 1.1rem; padding: 0; }
.headline { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.kpi { border: 1px solid var(--line); border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; background: #fafbfc; }
.kpi .v { font-size: 1.45rem; font-weight: 600; }
.kpi .l { font-size: .8rem; color: var(--muted); }
table { border-collapse: collapse; font-size: .86rem; margin: .3rem 0 .8rem; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; text-align: right; white-space: nowrap; }
th { background: var(--head); font-weight: 600; white-space: normal; vertical-align: bottom; }
.scroll { overflow-x: auto; max-width: 100%; }
td.t, th.t { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #9aa0a6; font-size: .8em; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
tr.scoring td { background: #fff7d6; font-weight: 600; }
tr.failed td { background: #fdecea; }
.figs { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .8rem; color: var(--muted); max-width: 560px; }
.legend span { display: inline-block; margin-right: 1rem; font-size: .85rem; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em; vertical-align: -.1em;
            border: 1px solid #555; }
.params td { text-align: left; white-space: normal; }
.params th { white-space: nowrap; vertical-align: top; }
footer { margin-top: 2rem; color: var(--muted); font-size: .8rem; }
a { color: var(--accent); }
"""

_SORT_JS = """
(function () {
  function val(row, col) {
    var td = row.cells[col];
    if (!td) return '';
    var v = td.getAttribute('data-value');
    return v === null ? td.textContent.trim() : v;
  }
  function sortBy(table, col, th) {
    var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute('aria-sort');
    th.setAttribute('aria-sort', dir);
    var sign = dir === 'ascending' ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = val(a, col), y = val(b, col);
      if (x === '' || y === '') return (x === '') - (y === '');
      var nx = Number(x), ny = Number(y);
      if (!isNaN(nx) && !isNaN(ny)) return sign * (nx - ny);
      return sign * x.localeCompare(y, undefined, {numeric: true});
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables, function (table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.title = 'Sort by this column';
      th.addEventListener('click', function () { sortBy(table, col, th); });
      th.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(table, col, th); }
      });
    });
  });
})();
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v) -> float | None:
    """Float or None (None, '', NaN, non-numbers)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _missing(v) -> bool:
    """No value: None, an empty cell, or NaN (a score with no cells, as pandas writes it)."""
    return v is None or (isinstance(v, str) and v == "") or (isinstance(v, float) and math.isnan(v))


def _fmt(v, digits: int = 1, unit: str = "") -> str:
    f = _num(v)
    if f is None:
        return _MISSING
    s = f"{f:.{digits}f}" if digits > 0 else f"{int(round(f))}"
    return f"{s}{unit}"


def _td(v, digits: int = 1, unit: str = "", cls: str = "") -> str:
    f = _num(v)
    dv = "" if f is None else repr(f)
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-value="{dv}">{_e(_fmt(v, digits, unit))}</td>'


def _td_text(text, cls: str = "t", inner_html: str | None = None) -> str:
    content = inner_html if inner_html is not None else _e(text)
    return f'<td class="{cls}" data-value="{_e(text)}">{content}</td>'


def _rgb01(rgb) -> tuple:
    return tuple(c / 255.0 for c in rgb)


def bin_color(b, n_thresholds: int = 3) -> tuple[int, int, int]:
    """QuPath colour (RGB 0-255) of a bin: 0 negative, 1-3 intensity, -1 unscored."""
    try:
        b = int(b)
    except (TypeError, ValueError):
        return UNSCORED_COLOR
    if b < 0:
        return UNSCORED_COLOR
    if n_thresholds == 1:
        return BIN_COLORS["Positive"] if b >= 1 else BIN_COLORS["Negative"]
    return BIN_COLORS.get({0: "Negative", 1: "1+", 2: "2+", 3: "3+"}.get(b, "3+"), UNSCORED_COLOR)


def _bin_labels(n_thresholds: int):
    if n_thresholds == 1:
        return [(0, "Negative"), (1, "Positive")]
    return [(0, "Negative"), (1, "1+"), (2, "2+"), (3, "3+")]


def _n_thresholds(summary: Mapping) -> int:
    t = summary.get("thresholds")
    try:
        return 1 if t is not None and len(t) == 1 else 3
    except TypeError:
        return 3


def scoring_measurement(summary: Mapping) -> str:
    """Name of the scoring measurement column, e.g. ``"Cell: DAB OD mean"``.

    ``summary["measurement"]`` when present, else built from ``compartment``
    (default ``cell``) and ``statistic`` (default ``mean``).
    """
    m = summary.get("measurement")
    if m:
        return str(m)
    comp = str(summary.get("compartment") or "cell")
    stat = str(summary.get("statistic") or "mean")
    return f"{comp.capitalize()}: DAB OD {stat}"


def _fig_uri(fig: Figure, dpi: int = 100) -> str:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    size = ""
    png = base64.b64decode(uri.split(",", 1)[1][:44])  # IHDR: width, height at bytes 16-24
    if png[:8] == b"\x89PNG\r\n\x1a\n":
        w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        size = f' width="{w}" height="{h}"'
    return f'<figure><img src="{uri}"{size} alt="{_e(alt)}">{cap}</figure>'


def _legend_html(n_thresholds: int, unscored: bool = False) -> str:
    items = [(bin_color(b, n_thresholds), name) for b, name in _bin_labels(n_thresholds)]
    if unscored:
        items.append((UNSCORED_COLOR, "unscored"))
    spans = "".join(
        f'<span><i style="background:rgb{tuple(c)}"></i>{_e(n)}</span>' for c, n in items
    )
    return f'<div class="legend">{spans}</div>'


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{body}\n<script>{_SORT_JS}</script>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def _resize_mask(mask: np.ndarray, shape) -> np.ndarray:
    mask = np.asarray(mask).astype(bool)
    if mask.shape == tuple(shape):
        return mask
    # the mask pixel under each thumbnail pixel's centre
    rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(int).clip(0, mask.shape[0] - 1)
    cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(int).clip(0, mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def _outline_mask(tissue_mask, shape):
    """The tissue mask at the thumbnail's size when it has an outline to draw (neither empty nor everything),
    else None."""
    if tissue_mask is None:
        return None
    m = _resize_mask(tissue_mask, shape)
    return m if m.any() and not m.all() else None


def _thumbnail_figure(thumbnail, tissue_mask, cells, downsample, n_thresholds, max_points=20000) -> tuple[str, bool]:
    """The thumbnail with the tissue outline and the cells' bins; (data URI, whether an outline is drawn)."""
    thumb = np.asarray(thumbnail)
    h, w = thumb.shape[:2]
    scale = 6.5 / max(h, w)
    fig = Figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0)))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(thumb, interpolation="antialiased")
    outline = _outline_mask(tissue_mask, (h, w))
    if outline is not None:
        ax.contour(outline.astype(float), levels=[0.5], colors=["#00a2ff"], linewidths=1.2)
    if cells is not None and downsample and len(cells) and {"x_px", "y_px", "bin"} <= set(cells.columns):
        sub = cells
        if len(sub) > max_points:
            sub = sub.sample(max_points, random_state=0)
        cols = np.array([_rgb01(bin_color(b, n_thresholds)) for b in sub["bin"].to_numpy()])
        size = float(np.clip(4000.0 / len(sub), 1.5, 10.0))  # points²: visible, never a carpet
        ax.scatter(_to_image(sub["x_px"].to_numpy(float), 0.0, downsample),
                   _to_image(sub["y_px"].to_numpy(float), 0.0, downsample),
                   s=size, c=cols, linewidths=0.3, edgecolors="black")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    return _fig_uri(fig), outline is not None


def _to_field(poly, origin, downsample):
    if poly is None or (isinstance(poly, float) and math.isnan(poly)):
        return None
    p = np.asarray(poly, float)
    if p.ndim != 2 or p.shape[0] < 3 or p.shape[1] != 2:
        return None
    return _to_image(p, np.asarray(origin, float), downsample)


def _to_image(level0, origin, downsample):
    """Level-0 coordinates (QuPath's convention: pixel k spans [k, k + 1)) -> those of an image whose first
    pixel starts at ``origin`` and spans ``downsample`` level-0 px, as matplotlib draws it (pixel j centred
    on j)."""
    return (level0 - origin) / downsample - 0.5


def _field_cells(spec, origin=(0.0, 0.0), downsample=1.0):
    """Normalise a field's cells to ('points', list of dicts in field px) or ('labels', (labels, bins)).

    A cell table with level-0 ``x_px``/``y_px`` (and ``nucleus_polygon``/``cell_polygon``)
    is mapped to field pixels with the field's ``origin_px`` and ``downsample`` (level-0 pixel ``k``
    spans ``[k, k + 1)``; field pixel ``j`` is centred at ``j``).
    """
    if spec is None:
        return "points", []
    if isinstance(spec, Mapping) and "labels" in spec:
        return "labels", (np.asarray(spec["labels"]), spec.get("bins"))
    records = spec.to_dict("records") if isinstance(spec, pd.DataFrame) else list(spec)
    ds = float(downsample or 1.0)
    out = []
    for c in records:
        c = dict(c)
        if "x" not in c and "x_px" in c:
            c["x"] = _to_image(float(c["x_px"]), origin[0], ds)
            c["y"] = _to_image(float(c["y_px"]), origin[1], ds)
            if c.get("polygon") is None:
                c["polygon"] = _to_field(c.get("nucleus_polygon"), origin, ds)
                c["outline"] = _to_field(c.get("cell_polygon"), origin, ds)
        out.append(c)
    return "points", out


def _field_figure(rgb, spec, n_thresholds, origin=(0.0, 0.0), downsample=1.0) -> str:
    from skimage.segmentation import find_boundaries

    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    scale = 3.6 / max(h, w)
    fig = Figure(figsize=(w * scale, h * scale))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="antialiased")
    kind, data = _field_cells(spec, origin, downsample)
    if kind == "labels":
        labels, bins = data
        bnd = find_boundaries(labels, mode="inner")
        overlay = np.zeros((h, w, 4), float)
        if bins is None:
            lut = {}
        elif isinstance(bins, Mapping):
            lut = {int(k): int(v) for k, v in bins.items()}
        else:
            lut = {i: int(v) for i, v in enumerate(np.asarray(bins).tolist())}
        ids = labels[bnd]
        colors = np.array([_rgb01(bin_color(lut.get(int(i), -1), n_thresholds)) for i in ids]) \
            if ids.size else np.zeros((0, 3))
        overlay[bnd, :3] = colors
        overlay[bnd, 3] = 1.0
        ax.imshow(overlay, interpolation="nearest")
    else:
        for c in data:
            col = _rgb01(bin_color(c.get("bin", -1), n_thresholds))
            outline = c.get("outline")
            if outline is not None and len(np.asarray(outline)) >= 3:
                q = np.asarray(outline, float)
                q = np.vstack([q, q[:1]])
                ax.plot(q[:, 0], q[:, 1], "-", color=col, linewidth=0.7, alpha=0.8)
            poly = c.get("polygon")
            if poly is not None and len(np.asarray(poly)) >= 3:
                p = np.asarray(poly, float)
                p = np.vstack([p, p[:1]])
                ax.plot(p[:, 0], p[:, 1], "-", color=col, linewidth=1.4)
            else:
                ax.scatter([c["x"]], [c["y"]], s=60, facecolors="none", edgecolors=[col], linewidths=1.6)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.axis("off")
    return _fig_uri(fig)


def _histogram_figure(cells, measurement, thresholds, n_thresholds) -> str | None:
    if cells is None or measurement not in getattr(cells, "columns", []):
        return None
    v = pd.to_numeric(cells[measurement], errors="coerce").to_numpy(float)
    ok = np.isfinite(v)
    if not ok.any():
        return None
    is_t = (cells["class"].astype(str).str.lower().isin(["tumour", "tumor"]).to_numpy()
            if "class" in cells.columns else np.zeros(len(cells), bool))
    th = [t for t in (_num(x) for x in (thresholds or [])) if t is not None]
    hi = max(float(np.nanpercentile(v[ok], 99.5)), (max(th) * 1.25) if th else 0.0, 0.05)
    lo = min(0.0, float(np.nanmin(v[ok])))
    edges = np.linspace(lo, hi, 61)
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_axes((0.1, 0.17, 0.87, 0.74))
    bounds = [lo] + th + [hi]
    for k in range(len(bounds) - 1):
        ax.axvspan(bounds[k], bounds[k + 1], color=_rgb01(bin_color(k, n_thresholds)), alpha=0.13, linewidth=0)
    vt, vo = np.clip(v[ok & is_t], lo, hi), np.clip(v[ok & ~is_t], lo, hi)
    ax.hist([vt, vo], bins=edges, stacked=True, color=["#444c5c", "#b3b8c2"],
            label=[f"tumour cells (n = {vt.size})", f"other cells (n = {vo.size})"])
    for k, t in enumerate(th):
        ax.axvline(t, color="#111111", linestyle="--", linewidth=1.1)
        ax.text(t, 0.98, f"t{k + 1} = {t:.2f} OD", transform=ax.get_xaxis_transform(),
                va="top", ha="right", rotation=90, fontsize=7.5,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1.0})
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"{measurement} (OD)")
    ax.set_ylabel("cells")
    ax.legend(fontsize=8, frameon=False, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _fig_uri(fig)


def _heat_values(grid):
    """(name, values, top, label) the heat map shows: the H-score, or positive % when there is none
    (one threshold); None when neither has a value."""
    if grid is None or len(grid) == 0:
        return None
    for col, name, top, label in (("h_score", "H-score", 300, "H-score (0–300)"),
                                  ("percent_positive", "Positive %", 100, "positive (%)")):
        if col in grid:
            v = pd.to_numeric(grid[col], errors="coerce").to_numpy(float)
            if np.isfinite(v).any():
                return name, v, top, label
    return None


def _heatmap_figure(grid, extent_um=None) -> tuple[str, str] | None:
    """The H-score (0-300) of each grid square as an image, or its positive % with one threshold; squares
    with too few cells are grey. ``extent_um``: the slide's (width, height), where the edge squares end.
    (data URI, what it shows: "H-score" or "Positive %"), or None."""
    shown = _heat_values(grid)
    if shown is None:
        return None
    what, values, top, label = shown
    size = float(grid["size_um"].iloc[0])
    gx = np.round(grid["x0_um"].to_numpy(float) / size).astype(int)
    gy = np.round(grid["y0_um"].to_numpy(float) / size).astype(int)
    img = np.full((gy.max() + 1, gx.max() + 1), np.nan)
    img[gy, gx] = values
    fig = Figure(figsize=(5.2, 4.0))
    ax = fig.add_axes((0.12, 0.12, 0.7, 0.8))
    ax.set_facecolor("#d0d0d0")
    im = ax.imshow(img, cmap="magma", vmin=0, vmax=top, interpolation="nearest",
                   extent=(0, img.shape[1] * size, img.shape[0] * size, 0))
    if extent_um is not None:  # an edge square covers only the slide's part of it
        ax.set_xlim(0, min(float(extent_um[0]), img.shape[1] * size))
        ax.set_ylim(min(float(extent_um[1]), img.shape[0] * size), 0)
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    cax = fig.add_axes((0.85, 0.12, 0.035, 0.8))
    fig.colorbar(im, cax=cax, label=label)
    return _fig_uri(fig), what


def _hscore_hist_figure(values, what: str = "tumour") -> str:
    fig = Figure(figsize=(6.0, 3.0))
    ax = fig.add_axes((0.1, 0.18, 0.86, 0.74))
    v = np.asarray([x for x in values if x is not None], float)
    ax.hist(v, bins=np.arange(0, 310, 10), color="#3558a8", edgecolor="white")
    ax.set_xlim(0, 300)
    ax.set_xlabel(f"{what} H-score (0–300)")
    ax.set_ylabel("slides")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"H-score distribution (n = {v.size} slides)", fontsize=10)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _fig_uri(fig)


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #
_SCORE_HEAD = (
    '<th class="t">Cells</th><th class="t">Compartment</th><th>n (cells)</th>'
    "<th>Negative (cells)</th><th>1+ (cells)</th><th>2+ (cells)</th><th>3+ (cells)</th>"
    "<th>H-score (0–300)</th><th>Positive (%)</th><th>Allred (0–8)</th><th>IRS (0–12)</th>"
)


def _score_row(group: str, comp: str, g: Mapping, scoring: bool) -> str:
    cls = ' class="scoring"' if scoring else ""
    label = f"{comp} (scoring)" if scoring else comp
    return (
        f"<tr{cls}>" + _td_text(group) + _td_text(comp, inner_html=_e(label))
        + _td(g.get("n"), 0) + _td(g.get("n_0"), 0) + _td(g.get("n_1"), 0) + _td(g.get("n_2"), 0)
        + _td(g.get("n_3"), 0) + _td(g.get("h_score"), 1) + _td(g.get("percent_positive"), 1, " %")
        + _td(g.get("allred"), 0) + _td(g.get("irs"), 0) + "</tr>"
    )


def headline_group(summary: Mapping) -> str:
    """The cell group the headline score uses: ``"all"`` when the preset scores all cells
    (``scoring.cells``, ``summary["scored_cells"]``), else ``"tumour"``."""
    return "all" if str(summary.get("scored_cells") or "tumour") == "all" else "tumour"


def _score_table(summary: Mapping) -> str:
    comp0 = str(summary.get("compartment") or "cell")
    head = headline_group(summary)
    rows = []
    for group in ("tumour", "all"):
        g = summary.get(group)
        if not isinstance(g, Mapping):
            continue
        byc = g.get("by_compartment") or {}
        if byc:
            names = [c for c in COMPARTMENTS if c in byc] + [c for c in byc if c not in COMPARTMENTS]
            for comp in names:
                rows.append(_score_row(group, comp, byc[comp] or {}, group == head and comp == comp0))
        else:
            rows.append(_score_row(group, comp0, g, group == head))
    return (
        f'<div class="scroll"><table id="score-table" class="sortable"><thead><tr>{_SCORE_HEAD}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


_REGION_COLS = (
    ("n", "n (cells)", 0, ""),
    ("h_score", "H-score (0–300)", 1, ""),
    ("percent_positive", "Positive (%)", 1, " %"),
    ("allred", "Allred (0–8)", 0, ""),
    ("irs", "IRS (0–12)", 0, ""),
)
_NAME_KEYS = ("name", "region", "id", "label")


#: Preset parameters in OD whose names do not say so.
_OD_KEYS = ("threshold", "thresholds", "max_background", "hematoxylin_threshold")


def _unit_for(key: str) -> tuple[str, int, str]:
    """(header suffix, digits, value unit) guessed from a key name."""
    k = key.lower()
    if k.endswith("_um2") or "µm^2" in k or "um2" in k:
        return " (µm²)", 1, ""
    if k.endswith("_mm2") or "mm2" in k:
        return " (mm²)", 3, ""
    if k.endswith("_um") or k.endswith(" µm"):
        return " (µm)", 1, ""
    if k.endswith("_px"):
        return " (px)", 0, ""
    if "percent" in k or k.endswith("_pct"):
        return " (%)", 1, " %"
    if k.endswith("_s"):
        return " (s)", 1, ""
    if k in ("n", "n_cells") or k.endswith("_n") or (k.startswith("n_") and k[2:].isdigit()):
        return " (cells)", 0, ""
    if "od" in k.split("_") or "OD" in key or k in _OD_KEYS:
        return " (OD)", 3, ""
    return "", 2, ""


def _label_for(key: str) -> tuple[str, int, str]:
    """(column label with unit, digits, value unit) for a free-form key such as ``area_mm2``."""
    suffix, digits, unit = _unit_for(key)
    stem = key
    for tail in ("_um2", "_mm2", "_um", "_px", "_s", "_pct"):
        if suffix and key.endswith(tail) and len(key) > len(tail):
            stem = key[: -len(tail)]
            break
    return stem.replace("_", " ") + suffix, digits, unit


def _records_table(records: Sequence[Mapping], table_id: str) -> str:
    """Generic sortable table of flat-ish dicts (nested tumour/all groups flattened)."""
    flat = []
    for r in records:
        d = {}
        for k, v in (r or {}).items():
            if isinstance(v, Mapping) and k in ("tumour", "all"):
                for kk in ("n", "h_score", "percent_positive", "allred", "irs"):
                    if kk in v:
                        d[f"{k}_{kk}"] = v[kk]
            elif isinstance(v, Mapping) or (isinstance(v, (list, tuple)) and len(v) > 4):
                continue
            else:
                d[k] = v
        flat.append(d)
    keys: list[str] = []
    for d in flat:
        for k in d:
            if k not in keys:
                keys.append(k)
    name_keys = [k for k in _NAME_KEYS if k in keys]
    keys = name_keys + [k for k in keys if k not in name_keys]
    known = {k: (h, dg, u) for k, h, dg, u in _REGION_COLS}
    head, specs = [], []
    for k in keys:
        base = k.split("_", 1)[1] if k.startswith(("tumour_", "all_")) else k
        if base in known:
            label, digits, unit = known[base]
            label = (k.split("_", 1)[0] + " " + label) if base != k else label
        else:
            label, digits, unit = _label_for(k)
        numeric = all(_num(d.get(k)) is not None or _missing(d.get(k)) for d in flat) and k not in name_keys
        head.append(f'<th class="{"" if numeric else "t"}">{_e(label)}</th>')
        specs.append((k, numeric, digits, unit))
    body = []
    for d in flat:
        cells = []
        for k, numeric, digits, unit in specs:
            v = d.get(k)
            if numeric:
                cells.append(_td(v, digits, unit))
            else:
                txt = "" if _missing(v) else (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
                cells.append(_td_text(txt))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table id="{table_id}" class="sortable"><thead><tr>{"".join(head)}</tr>'
            f"</thead><tbody>{''.join(body)}</tbody></table></div>")


def _vec(v, digits=4) -> str:
    try:
        return "(" + ", ".join(f"{float(x):.{digits}f}" for x in v) + ")"
    except (TypeError, ValueError):
        return str(v)


def _params_table(summary: Mapping) -> str:
    rows = []

    def add(name, value):
        rows.append(f'<tr><th class="t">{_e(name)}</th><td>{_e(value)}</td></tr>')

    add("Preset", summary.get("preset") if summary.get("preset") is not None else _MISSING)
    add("Scoring compartment", summary.get("compartment") or _MISSING)
    add("Scoring measurement", scoring_measurement(summary) + " (OD)")
    th = summary.get("thresholds")
    if th is not None:
        try:
            add("Thresholds", " / ".join(f"{float(t):.3f}" for t in th) + " OD")
        except (TypeError, ValueError):
            add("Thresholds", str(th))
    sv = summary.get("stain_vectors")
    if isinstance(sv, Mapping):
        for key, label in (("hematoxylin", "Hematoxylin"), ("dab", "DAB"), ("residual", "Residual")):
            if sv.get(key) is not None:
                add(f"Stain vector: {label}", _vec(sv[key]) + " (unit OD vector, R G B)")
        if sv.get("name"):
            add("Stain vectors name", sv["name"])
    elif sv is not None:
        add("Stain vectors", str(sv))
    bg = summary.get("background_rgb")
    if bg is None and isinstance(sv, Mapping):
        bg = sv.get("background")
    if bg is not None:
        try:
            add("Background (I0)", "(" + ", ".join(f"{float(c):g}" for c in bg) + ") (RGB, 0–255)")
        except (TypeError, ValueError):
            add("Background (I0)", str(bg))
    if summary.get("mpp") is not None:
        add("Pixel size", _fmt(summary.get("mpp"), 4, " µm/px"))
    if summary.get("n_cells") is not None:
        add("Cells detected", _fmt(summary.get("n_cells"), 0, " cells"))
    add("Software version", f"ihcscore {summary.get('software_version') or _MISSING}")
    if summary.get("runtime_s") is not None:
        add("Runtime", _fmt(summary.get("runtime_s"), 1, " s"))
    shown = {"slide", "mpp", "preset", "stain_vectors", "background_rgb", "thresholds", "compartment",
             "n_cells", "tumour", "all", "software_version", "runtime_s", "warnings", "regions",
             "hotspots", "measurement"}
    def add_value(label_prefix, key, v):
        label, digits, unit = _label_for(key)
        label = label_prefix + label
        if isinstance(v, Mapping):
            for kk, vv in v.items():
                add_value(f"{label}: ", str(kk), vv)
        elif _num(v) is not None and not isinstance(v, bool):
            add(label, f"{float(v):.4g}{unit}")
        elif isinstance(v, (list, tuple)) and v and all(_num(x) is not None for x in v):
            add(label, ", ".join(f"{float(x):.4g}" for x in v) + unit)
        else:
            add(label, str(to_jsonable(v)))

    for k, v in summary.items():
        if k in shown or isinstance(v, (list, tuple)) and len(v) > 12:
            continue
        add_value("", str(k), v)
    return f'<table class="params" id="params-table"><tbody>{"".join(rows)}</tbody></table>'


def _warnings_html(warnings) -> str:
    if not warnings:
        return ""
    if isinstance(warnings, str):
        warnings = [warnings]
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return (f'<div class="warnings" role="alert" id="warnings"><strong>⚠ {len(warnings)} '
            f'warning{"s" if len(warnings) != 1 else ""}</strong><ul>{items}</ul></div>')


def _kpis(summary: Mapping) -> str:
    def group(name):
        return summary.get(name) if isinstance(summary.get(name), Mapping) else {}

    t, a = group("tumour"), group("all")
    if headline_group(summary) == "all":
        g, h_label, pos_label = a, "all-cell H-score (0–300)", "all cells positive (%)"
    else:
        g, h_label, pos_label = t, "tumour H-score (0–300)", "tumour cells positive (%)"
    items = [
        (_fmt(g.get("h_score"), 1), h_label),
        (_fmt(g.get("percent_positive"), 1, " %"), pos_label),
        (_fmt(g.get("allred"), 0), "Allred score (0–8)"),
        (_fmt(g.get("irs"), 0), "IRS (0–12)"),
        (_fmt(t.get("n"), 0), "tumour cells (n)"),
        (_fmt(a.get("n", summary.get("n_cells")), 0), "all cells (n)"),
    ]
    return '<div class="headline">' + "".join(
        f'<div class="kpi"><div class="v">{_e(v)}</div><div class="l">{_e(l)}</div></div>' for v, l in items
    ) + "</div>"


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
def slide_report_html(
    summary: Mapping,
    cells: pd.DataFrame | None = None,
    thumbnail=None,
    tissue_mask=None,
    fields=None,
    thumbnail_downsample: float | None = None,
    title: str | None = None,
    hotspot_grid: pd.DataFrame | None = None,
) -> str:
    """HTML report of one slide (a complete, self-contained page).

    Parameters
    ----------
    summary : dict
        summary.json content (``slide``, ``thresholds``, ``tumour``/``all``
        groups with ``by_compartment``, optional ``warnings``, ``regions``,
        ``hotspots``; see DESIGN.md).
    cells : pandas.DataFrame, optional
        Cell table; its scoring measurement column (:func:`scoring_measurement`)
        is histogrammed, and with ``thumbnail_downsample`` the cells are drawn on
        the thumbnail coloured by bin.
    thumbnail : (H, W, 3) uint8 array, optional
        Whole-slide thumbnail.
    tissue_mask : 2-D bool array, optional
        Tissue mask at any resolution covering the same area as ``thumbnail``;
        its outline is drawn.
    fields : list, optional
        Representative fields. Each item is ``(rgb, cells)``,
        ``(rgb, cells, title)`` or a dict with ``rgb``, ``cells``, ``title``.
        ``cells`` is a list of dicts (or a DataFrame) with ``x``, ``y`` (field
        px), ``bin`` and optional ``polygon`` ((N, 2) field px), drawn as
        outlines/circles in the bin colour; or ``{"labels": label_image,
        "bins": {label: bin} or array indexed by label}`` for drawn boundaries.
    thumbnail_downsample : float, optional
        Level-0 pixels per thumbnail pixel.
    title : str, optional
        Page title (default ``"ihcscore report: <slide>"``).

    Returns
    -------
    html : str
    """
    summary = dict(summary or {})
    slide = str(summary.get("slide") or "slide")
    title = title or f"ihcscore report: {slide}"
    n_th = _n_thresholds(summary)
    measurement = scoring_measurement(summary)
    parts = [f"<h1>{_e(title)}</h1>"]
    sub = [f"Slide <strong>{_e(slide)}</strong>"]
    if summary.get("preset") is not None:
        sub.append(f"preset <strong>{_e(summary.get('preset'))}</strong>")
    sub.append(f"scored on {_e(measurement)} (OD)")
    parts.append(f'<p class="sub">{" · ".join(sub)}</p>')
    parts.append(_warnings_html(summary.get("warnings")))
    parts.append(_kpis(summary))

    parts.append("<h2>Scores</h2>")
    parts.append('<p class="sub">Per cell group and compartment; the highlighted row is the headline score. '
                 "H-score = (1·n<sub>1+</sub> + 2·n<sub>2+</sub> + 3·n<sub>3+</sub>) / n × 100. "
                 "Click a column header to sort.</p>")
    parts.append(_score_table(summary))

    regions = summary.get("regions")
    if regions:
        parts.append("<h2>Regions</h2>")
        parts.append(_records_table(list(regions), "regions-table"))
    hot = summary.get("hotspots")
    if hot:
        parts.append("<h2>Hotspots</h2>")
        if isinstance(hot, Mapping) and "top" in hot:
            parts.append(f'<p class="sub">Highest-scoring squares of a {_e(hot.get("grid_um"))} µm grid '
                         f'(squares with at least {_e(hot.get("min_cells"))} scored cells); '
                         "x0, y0: top-left corner in µm.</p>")
            hot = hot["top"] or [{"note": "no square has enough cells"}]
        recs = list(hot) if isinstance(hot, (list, tuple)) else [hot]
        if all(isinstance(r, Mapping) for r in recs):
            parts.append(_records_table(recs, "hotspots-table"))
        else:
            parts.append(f"<pre>{_e(to_jsonable(hot))}</pre>")
    dims, mpp = summary.get("dimensions_px"), _num(summary.get("mpp"))
    heat = _heatmap_figure(hotspot_grid, [d * mpp for d in dims] if dims and mpp else None)
    if heat:
        heat, what = heat
        parts.append(_img(heat, f"{what} heat map",
                          f"{what} per grid square (µm from the slide's top-left corner); grey: too few cells."))

    figs = []
    if thumbnail is not None:
        uri, outlined = _thumbnail_figure(thumbnail, tissue_mask, cells, thumbnail_downsample, n_th)
        cap = "Thumbnail"
        if outlined:
            cap += "; blue line: tissue mask outline"
        if thumbnail_downsample and cells is not None:
            cap += "; dots: cells coloured by bin"
        figs.append(_img(uri, "slide thumbnail", _e(cap) + "."))
    hist = _histogram_figure(cells, measurement, summary.get("thresholds"), n_th)
    if hist:
        figs.append(_img(hist, "DAB histogram",
                         _e(f"Histogram of {measurement} (OD) per cell; dashed lines: thresholds; "
                            "shading: bins.")))
    if figs:
        parts.append("<h2>Slide</h2>")
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
        if thumbnail_downsample and cells is not None:
            parts.append(_legend_html(n_th, unscored=True))

    if fields:
        parts.append("<h2>Representative fields</h2>")
        parts.append(_legend_html(n_th, unscored=True))
        items = []
        for k, f in enumerate(fields):
            origin, ds = (0.0, 0.0), 1.0
            if isinstance(f, Mapping):
                rgb, spec, ftitle = f.get("rgb"), f.get("cells"), f.get("title")
                origin = tuple(f.get("origin_px") or (0.0, 0.0))
                ds = float(f.get("downsample") or 1.0)
            else:
                rgb, spec = f[0], f[1]
                ftitle = f[2] if len(f) > 2 else None
            if not ftitle:
                ftitle = f"Field {k + 1}"
                if isinstance(f, Mapping) and f.get("origin_px") is not None:
                    h, w = np.asarray(rgb).shape[:2]
                    mpp = _num(summary.get("mpp"))
                    ftitle += f" at ({origin[0]:.0f}, {origin[1]:.0f}) px"
                    if mpp:
                        ftitle += f", {w * ds * mpp:.0f} × {h * ds * mpp:.0f} µm"
            items.append(_img(_field_figure(rgb, spec, n_th, origin, ds), ftitle, _e(ftitle)))
        parts.append(f'<div class="figs">{"".join(items)}</div>')

    parts.append("<h2>Parameters</h2>")
    parts.append(_params_table(summary))
    parts.append(f"<footer>Generated by ihcscore {_e(summary.get('software_version') or '')}. "
                 "Self-contained page: images are embedded.</footer>")
    return _page(title, "\n".join(p for p in parts if p))


_COHORT_COLS = (
    ("n_cells", "Cells (n)", 0, ""),
    ("tumour_n", "Tumour cells (n)", 0, ""),
    ("tumour_h_score", "Tumour H-score (0–300)", 1, ""),
    ("tumour_percent_positive", "Tumour positive (%)", 1, " %"),
    ("tumour_allred", "Tumour Allred (0–8)", 0, ""),
    ("tumour_irs", "Tumour IRS (0–12)", 0, ""),
    ("all_h_score", "All H-score (0–300)", 1, ""),
    ("all_percent_positive", "All positive (%)", 1, " %"),
    ("runtime_s", "Runtime (s)", 1, ""),
)


def report_href(slide) -> str:
    """The relative link from a folder's ``index.html`` to a slide's ``report.html``: the slide name
    percent-encoded (a ``#`` or ``?`` in it would otherwise end the path)."""
    return f"{quote(str(slide))}/report.html"


def cohort_index_html(rows: Sequence[Mapping], links=None, title: str = "ihcscore cohort") -> str:
    """HTML index of a scored folder: a sortable table and the H-score distribution.

    Parameters
    ----------
    rows : sequence of dict
        ``summary.csv`` rows (:func:`ihcscore.export.summary_row`); values may
        be strings as read back from the CSV.
    links : dict or sequence, optional
        Slide -> href of its report (relative, e.g. ``"S1/report.html"``), or
        a list aligned with ``rows``, used as given (already URL-encoded). Default
        :func:`report_href` for rows with status ``ok``.
    title : str

    Returns
    -------
    html : str
    """
    rows = [dict(r) for r in rows]
    if links is None:
        links = {r.get("slide"): report_href(r.get("slide")) for r in rows
                 if str(r.get("status", "ok")) == "ok"}
    if not isinstance(links, Mapping):
        links = {r.get("slide"): l for r, l in zip(rows, links)}
    ok = [r for r in rows if str(r.get("status", "ok")) == "ok"]
    failed = [r for r in rows if str(r.get("status", "ok")) not in ("ok",)]
    # Each slide's headline H-score: of its tumour cells, or of all cells where its preset scores all cells.
    groups = {headline_group(r) for r in ok}
    hs = [_num(r.get(f"{headline_group(r)}_h_score")) for r in ok]
    hs_ok = [h for h in hs if h is not None]
    what = {frozenset({"tumour"}): "tumour", frozenset({"all"}): "all-cell"}.get(frozenset(groups), "headline")
    parts = [f"<h1>{_e(title)}</h1>"]
    med = f"{float(np.median(hs_ok)):.1f}" if hs_ok else _MISSING
    parts.append(f'<p class="sub">{len(rows)} slide{"s" if len(rows) != 1 else ""}: {len(ok)} scored, '
                 f'{len(failed)} not scored · '
                 f"median {what} H-score {_e(med)} (0–300)</p>")
    if failed:
        parts.append(_warnings_html([f"{r.get('slide')}: {r.get('status')}"
                                     + (f" ({r.get('error')})" if r.get("error") else "") for r in failed]))
    head = '<th class="t">Slide</th><th class="t">Status</th>' + "".join(
        f"<th>{_e(label)}</th>" for _, label, _, _ in _COHORT_COLS) + '<th class="t">Notes</th>'
    body = []
    for r in rows:
        slide = str(r.get("slide") or "")
        href = links.get(r.get("slide")) or links.get(slide)
        link = f'<a href="{_e(href)}">{_e(slide)}</a>' if href else _e(slide)
        status = str(r.get("status") or "")
        cls = ' class="failed"' if status != "ok" else ""
        note = " ".join(str(x) for x in (r.get("error"), r.get("warnings")) if x not in (None, ""))
        body.append(f"<tr{cls}>" + _td_text(slide, inner_html=link) + _td_text(status)
                    + "".join(_td(r.get(k), d, u) for k, _, d, u in _COHORT_COLS)
                    + _td_text(note) + "</tr>")
    parts.append("<h2>Slides</h2>")
    parts.append('<p class="sub">Click a column header to sort; the slide name opens its report.</p>')
    parts.append(f'<div class="scroll"><table id="cohort-table" class="sortable"><thead><tr>{head}</tr>'
                 f"</thead><tbody>{''.join(body)}</tbody></table></div>")
    if hs_ok:
        parts.append("<h2>H-score distribution</h2>")
        parts.append(_img(_hscore_hist_figure(hs_ok, what), "H-score histogram",
                          f"{what.capitalize()} H-score (0–300) of the scored slides, 10-point bins."))
    return _page(title, "\n".join(p for p in parts if p))


def write_slide_report(path, summary: Mapping, cells: pd.DataFrame | None = None, **kwargs) -> Path:
    """Write :func:`slide_report_html` to ``path`` atomically; returns the path."""
    text = slide_report_html(summary, cells, **kwargs)
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_cohort_index(path, rows: Sequence[Mapping], links=None, **kwargs) -> Path:
    """Write :func:`cohort_index_html` to ``path`` atomically; returns the path."""
    text = cohort_index_html(rows, links, **kwargs)
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)
