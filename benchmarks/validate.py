"""Validation on real slides -> docs/validation.md (run with ``./run validate``).

Scores, on real data with an external reference:

1. OS-2 Ki67 crop (Hamamatsu NDPI, 0.2271 µm/px) with QuPath 0.3.2's exact settings
   (preset ``qupath-os2-ki67``) at its four reference settings: cell count and positive %
   beside QuPath's.
2. EndoNuke (141 real ER/PR IHC tiles, 0.5 µm/px, expert nucleus points): nucleus detection
   precision / recall / F1 (one-to-one Hungarian matching within 4 µm) for ihcscore's nuclear
   preset (``ki67``; ``er``/``pr`` share its detection keys), for QuPath's default detection
   settings, and for a plain scikit-image pipeline (rgb2hed + Otsu + distance watershed),
   beside HistomicsTK's published 0.81. Tuning used the even-numbered tiles only: both halves
   are reported.
3. Epithelium vs stroma on the EndoNuke nuclei ihcscore found (matched to expert points):
   balanced accuracy of the default morphology rule (tumour = epithelium) and of the trainable
   classifier (``classify.train_classifier``; trained on the even tiles, tested on the odd).
4. Scanner independence: OS-2 re-rendered with another scanner's colour response (other H and
   DAB vectors, background, gamma); positive % with default vectors and with ``--stains auto``.
5. Real vendor files through ``ihcscore score``: an H&E Aperio SVS (expects a stain warning)
   and a fluorescence DAPI NDPI (expects a refusal or a warning), no crash.

The full data sets are read from ``../shared/data/real`` when present; otherwise the repository's
copies (``sample_slides/``, ``tests/data/real/``: 10 EndoNuke tiles) are used and the report says so.
The report goes to ``docs/validation.md`` only from the full data sets: a run on the repository's
copies writes ``results/validation.md`` (untracked) and leaves the committed report alone (``--out``
chooses another path).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ihcscore import classify  # noqa: E402
from ihcscore.pipeline import analyze_region  # noqa: E402
from ihcscore.preset import load_preset  # noqa: E402
from ihcscore.slide import slide_name  # noqa: E402
from ihcscore.stains import H_DAB_DEFAULT, StainVectors, estimate_stain_vectors, rgb_to_od  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "real"
OS2_MPP = 0.2271
ENDONUKE_MPP = 0.5
MATCH_UM = 4.0
#: QuPath 0.3.2 on the OS-2 crop (data/PROVENANCE.md): (detection threshold, DAB threshold) -> (cells, positive %).
QUPATH_OS2 = {(0.2, 0.2): (1323, 16.5532879819), (0.2, 0.5): (1323, 11.8669690098),
              (0.4, 0.2): (1066, 20.5440900563), (0.4, 0.5): (1066, 14.7279549719)}
#: Published/peer figures on EndoNuke nucleus detection (F1, 4 µm matching) given in the project brief.
HISTOMICSTK_F1 = 0.81
PLAIN_SKIMAGE_F1_REF = 0.76
#: QuPath's own default detection settings (its dialog defaults), on the OD-sum image.
QUPATH_DEFAULT_DETECTION = dict(image="od_sum", background_radius_um=8.0, median_radius_um=0.0, sigma_um=1.5,
                                threshold=0.1, min_area_um2=10.0, max_area_um2=400.0, max_background=2.0,
                                split_by_shape=True, hematoxylin_threshold=0.0)
#: The simulated second scanner: other stain colours, a tinted glass and a non-linear camera response.
SCANNER_B = dict(hematoxylin=(0.70, 0.62, 0.35), dab=(0.50, 0.64, 0.58), background=(240, 235, 245), gamma=0.9)


def log(msg):
    print(msg, flush=True)


def default_report_path(full: bool) -> Path:
    """``docs/validation.md`` (committed) from the full data sets, else ``results/validation.md`` (untracked)."""
    return ROOT / ("docs" if full else "results") / "validation.md"


# ---------------------------------------------------------------- data

def find_data():
    """Paths of every data set and notes on what was used."""
    notes = []
    d = {}
    full = SHARED.is_dir()
    if full:
        notes.append(f"full data sets from `{os.path.relpath(SHARED, ROOT)}`")
    else:
        notes.append("the full data sets (`../shared/data/real`) are ABSENT here: using the repository's copies "
                     "(`sample_slides/OS-2-ndpi.ome.tif`, 10 EndoNuke tiles in `tests/data/real/endonuke`)")
    d["os2"] = SHARED / "OS-2-ndpi.ome.tif" if full else ROOT / "sample_slides" / "OS-2-ndpi.ome.tif"
    d["os2_ref"] = SHARED / "OS-2-ndpi.qupath-0.3.2.tsv" if full else None
    endo = SHARED / "endonuke" if full and (SHARED / "endonuke").is_dir() else ROOT / "tests" / "data" / "real" / "endonuke"
    d["endonuke"] = endo
    real = ROOT / "tests" / "data" / "real"
    d["svs"] = (SHARED if full else real) / "CMU-1-Small-Region.svs"
    d["ndpi"] = (SHARED if full else real) / "stritt-test3-DAPI.ndpi"
    d["full"] = full
    return d, notes


def qupath_reference(path):
    if path is None or not Path(path).is_file():
        return dict(QUPATH_OS2)
    t = pd.read_csv(path, sep="\t")
    return {(float(r["Detection threshold"]), float(r["DAB threshold"])): (int(r["Num cells"]), float(r["Positive %"]))
            for _, r in t.iterrows()}


def read_rgb(path):
    """RGB uint8; RGBA PNGs are composited over white (two EndoNuke tiles have transparent padding)."""
    if str(path).lower().endswith((".tif", ".tiff")):
        import tifffile

        a = tifffile.imread(path)
    else:
        import imageio.v3 as iio

        a = iio.imread(path)
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = np.rint(a[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def endonuke_tiles(folder):
    """[(name, rgb, points (K, 2) px, classes (K,))] sorted by tile number."""
    out = []
    for f in sorted(glob.glob(str(Path(folder) / "images" / "*.png")), key=lambda p: int(Path(p).stem)):
        lab = np.loadtxt(str(Path(folder) / "labels" / (Path(f).stem + ".txt")), ndmin=2)
        lab = lab.reshape(-1, 3)
        # the experts' points are pixel indices: the pixel's centre in ihcscore's (QuPath's) coordinates, where
        # pixel k spans [k, k + 1), is k + 0.5
        out.append((Path(f).stem, read_rgb(f), lab[:, :2].astype(float) + 0.5, lab[:, 2].astype(int)))
    return out


# ---------------------------------------------------------------- matching

def match_points(gt, det, radius_px):
    """One-to-one matching (Hungarian on distance, pairs beyond ``radius_px`` forbidden).

    Returns a list of (gt index, det index).
    """
    if len(gt) == 0 or len(det) == 0:
        return []
    d = cdist(gt, det)
    cost = np.where(d <= radius_px, d, 1e6)
    ri, ci = linear_sum_assignment(cost)
    ok = d[ri, ci] <= radius_px
    return list(zip(ri[ok].tolist(), ci[ok].tolist()))


def prf(tp, n_det, n_gt):
    p = tp / n_det if n_det else 0.0
    r = tp / n_gt if n_gt else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


# ---------------------------------------------------------------- detectors

def ihcscore_points(rgb, preset):
    res = analyze_region(rgb, ENDONUKE_MPP, preset)
    return res.cells[["x_px", "y_px"]].to_numpy(dtype=float), res.cells


def plain_skimage_points(rgb):
    """The textbook scikit-image pipeline: hematoxylin by rgb2hed, Otsu, distance-transform watershed."""
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops
    from skimage.segmentation import watershed

    h = rgb2hed(rgb)[..., 0]
    mask = h > threshold_otsu(h)
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask))
    lab, n = ndi.label(mask)
    mask = (np.bincount(lab.ravel(), minlength=n + 1) >= 20)[lab] & mask  # drop objects under 20 px
    dist = ndi.distance_transform_edt(mask)
    comp, _ = ndi.label(mask)
    peaks = peak_local_max(dist, min_distance=5, labels=comp, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    # scikit-image centres pixel k on k: + 0.5 to the coordinates the expert points are in (see endonuke_tiles)
    return np.array([[p.centroid[1], p.centroid[0]] for p in regionprops(labels) if p.area >= 20]).reshape(-1, 2) + 0.5


# ---------------------------------------------------------------- 1. OS-2

def validate_os2(data):
    import tifffile

    rgb = tifffile.imread(data["os2"])[..., :3]
    ref = qupath_reference(data["os2_ref"])
    preset = load_preset("qupath-os2-ki67")
    rows = []
    for det in (0.2, 0.4):
        res = analyze_region(rgb, OS2_MPP, preset.replace(threshold=det))
        v = res.cells["Nucleus: DAB OD mean"].to_numpy()
        for dab in (0.2, 0.5):
            n_q, pos_q = ref[(det, dab)]
            pos = 100.0 * float((v >= dab).mean()) if len(v) else float("nan")
            rows.append(dict(detection_threshold=det, dab_threshold=dab, cells=len(v), qupath_cells=n_q,
                             count_diff_pct=100.0 * (len(v) - n_q) / n_q, positive_pct=pos,
                             qupath_positive_pct=pos_q, positive_diff=pos - pos_q))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 2./3. EndoNuke

def validate_endonuke(data):
    tiles = endonuke_tiles(data["endonuke"])
    radius_px = MATCH_UM / ENDONUKE_MPP
    methods = {
        "ihcscore `ki67` preset (= `er`, `pr` detection)": lambda rgb: ihcscore_points(rgb, load_preset("ki67")),
        "ihcscore with QuPath's default detection settings": lambda rgb: ihcscore_points(
            rgb, load_preset("ki67").replace(**QUPATH_DEFAULT_DETECTION)),
        "plain scikit-image (rgb2hed + Otsu + distance watershed)": lambda rgb: (plain_skimage_points(rgb), None),
    }
    per_tile = {}
    tables = {}
    for mname, fn in methods.items():
        for name, rgb, pts, cls in tiles:
            det, table = fn(rgb)
            pairs = match_points(pts, det, radius_px)
            per_tile[(mname, name)] = (len(pairs), len(det), len(pts))
            if table is not None and mname.startswith("ihcscore `ki67`"):
                tables[name] = (table, pairs, cls)
    halves = {"even tiles (tuning)": [t for t in tiles if int(t[0]) % 2 == 0],
              "odd tiles (held out)": [t for t in tiles if int(t[0]) % 2 == 1],
              "all tiles": tiles}
    rows = []
    for mname in methods:
        for hname, ts in halves.items():
            tp = sum(per_tile[(mname, t[0])][0] for t in ts)
            nd = sum(per_tile[(mname, t[0])][1] for t in ts)
            ng = sum(per_tile[(mname, t[0])][2] for t in ts)
            p, r, f = prf(tp, nd, ng)
            rows.append(dict(method=mname, tiles=hname, n_tiles=len(ts), expert_nuclei=ng, detected=nd, matched=tp,
                             precision=p, recall=r, f1=f))
    return pd.DataFrame(rows), tables


def balanced_accuracy(y_true, y_pred):
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_pred, dtype=bool)
    if y_true.all() or (~y_true).all():
        return float("nan")
    return 0.5 * (float((y_pred[y_true]).mean()) + float((~y_pred[~y_true]).mean()))


def validate_classification(tables):
    """Epithelium (class 1) vs stroma (class 0) on matched nuclei; class 2 ("other") left out."""
    parts = {"train": [], "test": []}
    for k, (name, (table, pairs, cls)) in enumerate(sorted(tables.items(), key=lambda kv: int(kv[0]))):
        t = table.copy().reset_index(drop=True)
        # Tiles are separate regions: shift each far away so neighbourhoods never mix tiles.
        t["x_um"] = t["x_um"] + 10_000.0 * k
        label = np.full(len(t), None, dtype=object)
        truth = np.full(len(t), -1)
        for gi, di in pairs:
            truth[di] = cls[gi]
            if cls[gi] in (0, 1):
                label[di] = classify.TUMOUR if cls[gi] == 1 else classify.OTHER
        t["_label"] = label
        t["_truth"] = truth
        parts["train" if int(name) % 2 == 0 else "test"].append(t)
    train = pd.concat(parts["train"], ignore_index=True)
    test = pd.concat(parts["test"], ignore_index=True)
    rows = []

    def score(name, pred_train, pred_test):
        for split, t, pred in (("even tiles (training)", train, pred_train), ("odd tiles (held out)", test, pred_test)):
            keep = np.isin(t["_truth"].to_numpy(), (0, 1))
            y = t["_truth"].to_numpy()[keep] == 1
            p = np.asarray(pred)[keep] == classify.TUMOUR
            rows.append(dict(classifier=name, tiles=split, nuclei=int(keep.sum()), epithelium=int(y.sum()),
                             balanced_accuracy=balanced_accuracy(y, p), accuracy=float((y == p).mean())))

    score("default morphology rule (tumour = epithelium)", classify.classify_cells(train),
          classify.classify_cells(test))
    for model in ("random_forest", "gradient_boosting"):
        clf = classify.train_classifier(train.drop(columns=["_label", "_truth"]), train["_label"].to_list(),
                                        model=model, seed=0)
        score(f"trained {model.replace('_', ' ')} (morphology, hematoxylin, neighbourhood; no DAB)",
              clf.predict(train.drop(columns=["_label", "_truth"])), clf.predict(test.drop(columns=["_label", "_truth"])))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 4. scanner independence

def pad_with_glass(rgb, glass, margin):
    out = np.empty((rgb.shape[0] + 2 * margin, rgb.shape[1] + 2 * margin, 3), np.uint8)
    out[:] = np.asarray(glass, np.uint8)
    out[margin:-margin, margin:-margin] = rgb
    return out


def render_other_scanner(rgb, hematoxylin, dab, background, gamma):
    """Deconvolve with the default vectors, re-render with other stain vectors, glass colour and gamma."""
    c = rgb_to_od(rgb, H_DAB_DEFAULT.background) @ np.linalg.inv(H_DAB_DEFAULT.matrix)
    od = c @ StainVectors(hematoxylin, dab).matrix
    i = np.asarray(background, float) * np.power(10.0, -od)
    i = 255.0 * np.power(np.clip(i, 0, 255) / 255.0, gamma)
    return np.clip(np.rint(i), 0, 255).astype(np.uint8)


def validate_scanner(data):
    import tifffile

    rgb = tifffile.imread(data["os2"])[..., :3]
    # The crop is all tissue: a glass margin (150 µm at 0.2271 µm/px) lets background estimation see glass,
    # as it does on a whole slide. No cell is detected on it.
    margin = 660
    scan_a = pad_with_glass(rgb, (255, 255, 255), margin)
    scan_b = render_other_scanner(scan_a, SCANNER_B["hematoxylin"], SCANNER_B["dab"], SCANNER_B["background"],
                                  SCANNER_B["gamma"])
    preset = load_preset("qupath-os2-ki67")
    rows = []
    for scan, img in (("A: original (Hamamatsu)", scan_a), ("B: simulated other scanner", scan_b)):
        for mode in ("default vectors", "--stains auto"):
            if mode.startswith("default"):
                res = analyze_region(img, OS2_MPP, preset)
            else:
                res = analyze_region(img, OS2_MPP, preset.replace(estimate_stains=True))
            v = res.cells["Nucleus: DAB OD mean"].to_numpy()
            rows.append(dict(scan=scan, stains=mode, cells=len(v), positive_pct=100.0 * float((v >= 0.2).mean()),
                             positive_pct_05=100.0 * float((v >= 0.5).mean()),
                             hematoxylin=tuple(round(x, 3) for x in res.stains.hematoxylin),
                             dab=tuple(round(x, 3) for x in res.stains.dab),
                             background=tuple(int(round(x)) for x in res.stains.background)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- 5. vendor files

def validate_vendor_files(data):
    exe = Path(sys.executable).with_name("ihcscore")
    cmd0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "ihcscore.cli"]
    rows = []
    for key, expect in (("svs", "stain warning (H&E, not H-DAB)"), ("ndpi", "refused or warned (fluorescence)")):
        path = data[key]
        if not path.is_file():
            rows.append(dict(file=path.name, expected=expect, exit_code=None, outcome="file absent", ok=False))
            continue
        with tempfile.TemporaryDirectory() as out:
            cmd = cmd0 + ["score", str(path), "--out", out, "--preset", "ki67", "--quiet"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            crashed = "Traceback" in (p.stderr + p.stdout)
            summary = Path(out) / slide_name(path) / "summary.json"
            failures = Path(out) / "failures.csv"
            warnings, fail_reason = [], ""
            if summary.is_file():
                warnings = json.loads(summary.read_text()).get("warnings", [])
            if failures.is_file():
                f = pd.read_csv(failures)
                if len(f):
                    fail_reason = str(f.iloc[0].get("error", f.iloc[0].to_dict()))
            if key == "svs":
                ok = not crashed and any("H-DAB" in w or "DAB" in w for w in warnings)
                outcome = "; ".join(warnings) if warnings else (fail_reason or "scored without warning")
            else:
                ok = not crashed and (bool(fail_reason) or bool(warnings))
                outcome = (f"refused: {fail_reason}" if fail_reason else "; ".join(warnings)) or "scored without warning"
            rows.append(dict(file=path.name, expected=expect, exit_code=p.returncode, outcome=outcome[:300],
                             crashed=crashed, ok=ok))
    return pd.DataFrame(rows)


def stain_diagnostics(data, tiles_folder):
    """Residual fraction (``stains.stain_fit_report``, what ``pipeline.stain_warnings`` uses) and how DAB-like the
    estimated second stain is (cosine with QuPath's DAB), for the H&E slide and the H-DAB images."""
    import tifffile

    from ihcscore.slide import open_slide
    from ihcscore.stains import stain_fit_report

    imgs = []
    if data["svs"].is_file():
        with open_slide(data["svs"]) as s:
            imgs.append(("CMU-1-Small-Region.svs (H&E)", s.thumbnail(2048)))
    imgs.append(("OS-2 (Ki67, H-DAB)", tifffile.imread(data["os2"])[..., :3]))
    for name, rgb, _, _ in endonuke_tiles(tiles_folder)[:6]:
        imgs.append((f"EndoNuke {name} (ER/PR, H-DAB)", rgb))
    rows = []
    for name, rgb in imgs:
        rep = stain_fit_report(rgb)
        sv = estimate_stain_vectors(rgb)
        rows.append(dict(image=name, residual_fraction=rep["residual_fraction"], dab_fraction=rep["dab_fraction"],
                         dab_cosine=float(np.dot(sv.dab, H_DAB_DEFAULT.dab)),
                         second_stain=tuple(round(x, 2) for x in sv.dab)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- report

def fmt_table(df, cols, fmts=None):
    fmts = fmts or {}
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for _, c in cols:
            v = r[c]
            f = fmts.get(c)
            if f and v is not None and not (isinstance(v, float) and np.isnan(v)):
                cells.append(f.format(v))
            elif isinstance(v, float) and v.is_integer() and c not in ("detection_threshold", "dab_threshold"):
                cells.append(str(int(v)))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path, notes, os2, endo, cls, scan, vendor, diag, runtime_s, command):
    L = []
    L.append("# Validation on real slides\n")
    L.append(f"Generated by {command} (`benchmarks/validate.py`) in {runtime_s:.0f} s on "
             f"{os.cpu_count()} CPU core(s). Data: {'; '.join(notes)}. Credits and licences: "
             "`tests/data/real/CREDITS.md`, `sample_slides/OS-2-ndpi.CREDITS.md`.\n")

    L.append("## 1. QuPath equivalence: OS-2 Ki67 (Hamamatsu NDPI crop, 2202×2202 px, 0.2271 µm/px)\n")
    L.append("Preset `qupath-os2-ki67` = QuPath 0.3.2's settings (OD sum, 0.5 µm/px, no background subtraction, "
             "sigma 2 µm, area 10–400 µm², split by shape, no cell expansion), positive = `Nucleus: DAB OD mean` >= "
             "the DAB threshold. Reference: QuPath 0.3.2's own run (an algorithm's output, not a pathologist's). "
             "Bars: counts within 10 %, positive % within 3 points.\n")
    L.append(fmt_table(os2, [("detection threshold", "detection_threshold"), ("DAB threshold", "dab_threshold"),
                             ("ihcscore cells", "cells"), ("QuPath cells", "qupath_cells"),
                             ("count diff %", "count_diff_pct"), ("ihcscore positive %", "positive_pct"),
                             ("QuPath positive %", "qupath_positive_pct"), ("diff (points)", "positive_diff")],
                     {"count_diff_pct": "{:+.1f}", "positive_pct": "{:.2f}", "qupath_positive_pct": "{:.2f}",
                      "positive_diff": "{:+.2f}"}))
    ok = bool((os2["count_diff_pct"].abs() <= 10).all() and (os2["positive_diff"].abs() <= 3).all())
    L.append(f"\nBars met: **{'yes' if ok else 'NO'}**.\n")
    L.append(OS2_NOTES)

    L.append("\n## 2. Nucleus detection: EndoNuke (real ER/PR IHC, expert nucleus points)\n")
    L.append(f"Tiles of 200×200 px at 0.5 µm/px; one-to-one Hungarian "
             f"matching of detected nucleus centroids to expert points within {MATCH_UM:g} µm. One set of defaults "
             "for every tile (no per-tile tuning). ihcscore's nuclear-preset defaults were tuned on the even-numbered "
             "tiles only; the odd tiles are held out. Truth: the experts' points (class 0/1/2 all count).\n")
    L.append(fmt_table(endo, [("method", "method"), ("tiles", "tiles"), ("n", "n_tiles"),
                              ("expert nuclei", "expert_nuclei"), ("detected", "detected"), ("matched", "matched"),
                              ("precision", "precision"), ("recall", "recall"), ("F1", "f1")],
                       {"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}"}))
    sk = endo[(endo["method"].str.startswith("plain")) & (endo["tiles"] == "all tiles")]["f1"].iloc[0]
    L.append(f"\nPeers on EndoNuke (F1, 4 µm matching): HistomicsTK {HISTOMICSTK_F1:.2f} (reported); plain "
             f"scikit-image pipeline {PLAIN_SKIMAGE_F1_REF:.2f} (reported) and {sk:.3f} (computed above with "
             "this script's version of it: Otsu on rgb2hed hematoxylin, 1-px opening, holes filled, objects >= 20 px, "
             "distance-map peaks >= 5 px apart; it misses DAB-dark nuclei, hence its high precision and low recall). "
             "Bar: F1 >= 0.85.\n")
    L.append(ENDO_NOTES)

    L.append("\n## 3. Epithelium vs stroma (EndoNuke classes) on detected nuclei\n")
    L.append("Nuclei found by the `ki67` preset and matched to an expert point of class 1 (epithelium) or 0 (stroma); "
             "class 2 (other) is left out. The default rule's `tumour` is read as epithelium. The trainable classifier "
             "is `classify.train_classifier` (features: nucleus/cell morphology and hematoxylin, neighbourhood "
             "density and mean neighbour features within 20 and 50 µm; never DAB), trained on the even tiles and "
             "tested on the odd tiles.\n")
    L.append(fmt_table(cls, [("classifier", "classifier"), ("tiles", "tiles"), ("nuclei", "nuclei"),
                             ("epithelium", "epithelium"), ("balanced accuracy", "balanced_accuracy"),
                             ("accuracy", "accuracy")],
                       {"balanced_accuracy": "{:.3f}", "accuracy": "{:.3f}"}))
    L.append(CLS_NOTES)

    L.append("\n## 4. Scanner independence (OS-2 re-rendered as another scanner)\n")
    L.append(f"Scan B = scan A deconvolved with the default vectors and re-rendered with hematoxylin "
             f"{SCANNER_B['hematoxylin']}, DAB {SCANNER_B['dab']}, glass {SCANNER_B['background']}, gamma "
             f"{SCANNER_B['gamma']}; both scans get a 150-µm glass margin (white for A) so that the background can be "
             "estimated, as on a whole slide. Preset `qupath-os2-ki67` (detection 0.2), positive at DAB 0.2 and 0.5. "
             "Bar: `--stains auto` within 2 points of scan A, default vectors not.\n")
    L.append(fmt_table(scan, [("scan", "scan"), ("stains", "stains"), ("cells", "cells"),
                              ("positive % (DAB 0.2)", "positive_pct"), ("positive % (DAB 0.5)", "positive_pct_05"),
                              ("hematoxylin", "hematoxylin"), ("DAB", "dab"), ("background", "background")],
                       {"positive_pct": "{:.2f}", "positive_pct_05": "{:.2f}"}))
    lines = []
    for col, t in (("positive_pct", 0.2), ("positive_pct_05", 0.5)):
        piv = scan.set_index(["scan", "stains"])[col]
        for mode in scan["stains"].unique():
            a = piv[("A: original (Hamamatsu)", mode)]
            b = piv[("B: simulated other scanner", mode)]
            lines.append(f"- DAB {t:g}, {mode}: A {a:.2f} %, B {b:.2f} %, difference {b - a:+.2f} points "
                         f"({'within' if abs(b - a) <= 2 else 'NOT within'} 2 points)")
        a_def = piv[("A: original (Hamamatsu)", "default vectors")]
        b_auto = piv[("B: simulated other scanner", "--stains auto")]
        lines.append(f"- DAB {t:g}, scan B with --stains auto against scan A with default vectors (QuPath's way): "
                     f"{b_auto - a_def:+.2f} points")
    L.append("\n" + "\n".join(lines) + "\n")
    L.append(SCAN_NOTES)

    L.append("\n## 5. Real vendor files through `ihcscore score FILE --out DIR --preset ki67`\n")
    L.append(fmt_table(vendor, [("file", "file"), ("expected", "expected"), ("exit code", "exit_code"),
                                ("outcome", "outcome"), ("crashed", "crashed"), ("as expected", "ok")]))
    L.append("\nHow the H&E slide is caught: the residual share of stained OD hardly tells H&E from H-DAB (eosin "
             "projects mostly onto DAB, table below), but the second stain estimated from the tissue does: eosin's "
             "vector is far from DAB and absorbs green most. `pipeline.stain_warnings` warns when the cosine with "
             "DAB is below 0.95 (`pipeline.MIN_DAB_COSINE`) and green OD exceeds 1.4 x blue "
             "(`pipeline.EOSIN_GREEN_OVER_BLUE`; DAB absorbs blue most).\n")
    L.append(fmt_table(diag, [("image", "image"), ("residual fraction", "residual_fraction"),
                              ("DAB fraction", "dab_fraction"), ("cos(estimated 2nd stain, DAB)", "dab_cosine"),
                              ("estimated 2nd stain", "second_stain")],
                       {"residual_fraction": "{:.3f}", "dab_fraction": "{:.3f}", "dab_cosine": "{:.3f}"}))
    L.append(VENDOR_NOTES)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(L), encoding="utf-8")


OS2_NOTES = """
### Where ihcscore and QuPath still differ ([QUPATH_DETECTION.md](QUPATH_DETECTION.md) steps)

- **Binary watershed (step 9)** — the largest difference, now mostly closed. ImageJ finds the ultimate eroded
  points with its maxima finder in EDM mode: maximum heights are corrected to sub-pixel and a sorting error of
  about 0.8 px is tolerated along ridges, on top of the 0.5 px tolerance. A plain `h_maxima(edt, 0.5)` on
  scipy's discrete distance map finds spurious maxima along the ridge of elongated nuclei and cut them in two:
  +8 % cells (1429 and 1147 against QuPath's 1323 and 1066). ihcscore now smooths the distance map with a
  Gaussian of 0.75 px before the 0.5 px h-maxima (`cells.EDM_SMOOTH_PX`), a stand-in for ImageJ's correction,
  not a copy of it (counts at sigma 0 / 0.5 / 0.75 / 1.0 px: 1429 / 1352 / 1336 / 1318 at detection 0.2,
  with plain local-maxima seeds).
  Without splitting at all, 980 cells: splitting matters more than any other step here. ImageJ also floods an
  8-bit rescaled EDM; ihcscore floods the float map: a few dividing lines fall a pixel apart.
- **Regional maxima seeds (step 7)**: as QUPATH_DETECTION.md words it, maxima of the LoG with a 0.001 tolerance
  (`skimage.morphology.h_maxima(log, 0.001)`, `cells.SEED_TOLERANCE`); plain `local_maxima` gave 1336 / 1062
  cells instead of 1332 / 1060 (before the edge change below): the seeds only over-segment and step 9 merges
  neighbours again. QuPath's source
  (0.3.2–0.6) reads differently: interior 3×3 local maxima whose LoG is at least 0.001, made regional by
  reconstruction and labelled 4-connected. That rule, in a re-implementation of ihcscore's detection, gave
  1305 / 1054 cells and 16.78 / 12.11 % at detection 0.2: further from QuPath's 1323 / 1066 than the guide's
  rule, which is kept. QuPath's watershed also leaves 1-px lines between the LoG regions (0 / +1 cells).
- **Not tested by this reference**: it was run without background subtraction (radius 0) and without cell
  expansion, so steps 6 and 13 differ unseen here. Step 6: ihcscore bounds the reconstruction to 3 radii (seam-free
  tiles); at QuPath's default 8 µm and threshold 0.1 on this crop, 1328 cells and 17.47 % positive against 1242 and
  18.68 % unbounded (6 radii: 1286, 12: 1252), and ImageJ's erosion disk (805 px at 16 px against scikit-image's
  decomposed 861) moves it by about 1 %. Step 13: QuPath leaves 1-px dividing lines between touching cells and keeps
  pixels strictly closer than the expansion; ihcscore gives every pixel within it to the nearest nucleus (see
  docs/methods.md).
- **Matched since session 7**: sample standard deviations (n − 1); the refinement's 3×3 erosion repeats the edge
  pixels as ImageJ does (+2 / +1 cells here); median and exclude-DAB filters use ImageJ's footprints (21 px at
  radius 2, 29 at 2.5); `max_background` ≤ 0 turns the check off.
- **Resampling 0.2271 → 0.5 µm/px (step 1)**: ihcscore Gaussian-filters (sigma (scale − 1)/2) and samples
  bilinearly at pixel centres on a global grid (tile-independent); QuPath reads a downsampled region through
  its image server (interpolated resize without that pre-filter). Bilinear without pre-filter: 1437 vs 1429
  cells before the watershed change, positive % within 0.15 points: a small effect.
- **Refinement (step 10)** is done as documented (sigma-1 LoG of the detection image AND mask, OR the 1-px
  erosion). **Holes**: QuPath measures filled 4-connected polygon ROIs; ihcscore fills holes before splitting
  (only holes up to the largest nucleus's area: a larger one is a lumen, and filling it loses the ring of
  nuclei around it, differently per tile) and labels 4-connected components afterwards.
- **Counting**: QuPath's reference is one full-image annotation; `analyze_region` scores the crop in one
  piece, so there is no tiling difference here.
"""

ENDO_NOTES = """
### What limited detection, and what changed (looked at as overlays, tile by tile)

With QuPath's default settings on the OD-sum image (threshold 0.1, sigma 1.5 µm) ihcscore scores F1 0.73 (table
above):
- **False nuclei in DAB-stained cytoplasm and red-cell texture** (precision 0.69): 0.1 OD above the local
  background is far below the OD sum of a real nucleus (dark DAB nuclei reach 2–5). Threshold 0.7 removes them.
- **Pale hematoxylin-only (negative) nuclei beside dark DAB nuclei were lost** once the threshold was high
  enough for the first point; one OD-sum threshold cannot serve both. New optional step
  (`detection.hematoxylin_threshold`, 0 = off = QuPath): detect again on the hematoxylin channel (threshold
  0.2) and add the nuclei the OD-sum pass missed (at most 20 % overlap with an OD-sum nucleus). It also
  recovers nuclei in very dark areas where `max_background` rejects the OD-sum regions.
- **Touching nuclei merged** with sigma 1.5 µm: sigma 1.0 µm keeps them apart; the smaller LoG cores need a
  minimum area of 8 µm² (10 dropped real small stromal nuclei).
- **Binary watershed over-splitting** elongated nuclei (the OS-2 fix above) also cost precision here.
- The background reconstruction is bounded to 3 background radii of propagation (QuPath's is unbounded), so
  that tiled whole-slide results do not depend on the tiling; this moved F1 from 0.869 to 0.859 here.
- Background radius 8 µm and `max_background` barely matter on these 100-µm tiles (in the tuning sweeps,
  6–10 µm radius moved F1 by < 0.01 and max background 2–100 not at all). Two tiles (742, 744) are partly transparent: composited over white.
Remaining errors: nuclei inside near-black DAB clusters, a few elongated nuclei still cut in two, and expert
points on nuclei too pale to separate from the background.
"""

CLS_NOTES = """
The default rule was written for carcinoma (tumour nuclei 50–150 µm², lymphocytes small and round, fibroblasts
thin and elongated); endometrial stroma nuclei are plump and often round-oval, so the rule calls many of them
tumour: on this tissue it is near chance. A classifier trained on a few annotated regions of the tissue at hand
(`ihcscore train` with point annotations, then `ihcscore score --classifier`) is the way to adapt tumour/other;
the gap between its training and held-out scores shows how much it needs annotations from more slides.
"""


SCAN_NOTES = """
Reading the lines above: with default vectors the positive % moves with the scanner; `--stains auto` estimates
both vectors and the glass per slide and brings scan B back to scan A. Two caveats:
- The pair is assigned jointly (the pairing maximising cos(h, H0) + cos(d, DAB0)); the first version named each
  vector by its nearest default and swapped hematoxylin and DAB on scan B's greyish DAB (found by this benchmark,
  fixed in `stains.estimate_stain_vectors`).
- Estimated vectors differ from QuPath's "H-DAB default" even on the original scan, so auto-estimated positive %
  is not QuPath's number (rows A/default and A/auto): use default vectors for QuPath equivalence and auto for
  consistency across scanners. `estimate_background` on a crop with no glass would take pale tissue for glass
  (hence the glass margin here); a whole slide's thumbnail has glass.
"""


VENDOR_NOTES = """
The H&E slide is scored with the warning in `summary.json` and on the console (a meaningless DAB score is never
presented without it); the DAPI NDPI is refused by the slide reader with a clear message and a non-zero exit code
(failures.csv), no traceback.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="report path (Markdown; default: docs/validation.md with the full data sets, "
                         "results/validation.md without them)")
    ap.add_argument("--skip-cli", action="store_true", help="skip the vendor files through the CLI")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data, notes = find_data()
    for n in notes:
        log(f"data: {n}")
    out = Path(args.out) if args.out else default_report_path(data["full"])
    log("1. OS-2 QuPath equivalence ...")
    os2 = validate_os2(data)
    log(os2.to_string(index=False))
    log("2. EndoNuke nucleus detection ...")
    endo, tables = validate_endonuke(data)
    log(endo[["method", "tiles", "precision", "recall", "f1"]].to_string(index=False))
    log("3. epithelium vs stroma ...")
    cls = validate_classification(tables)
    log(cls.to_string(index=False))
    log("4. scanner independence ...")
    scan = validate_scanner(data)
    log(scan[["scan", "stains", "cells", "positive_pct", "positive_pct_05"]].to_string(index=False))
    if args.skip_cli:
        vendor = pd.DataFrame([dict(file="(skipped)", expected="", exit_code=None, outcome="--skip-cli",
                                    crashed=False, ok=False)])
    else:
        log("5. vendor files through the CLI ...")
        vendor = validate_vendor_files(data)
        log(vendor.to_string(index=False))
    diag = stain_diagnostics(data, data["endonuke"])
    log(diag.to_string(index=False))
    runtime = time.perf_counter() - t0
    command = "`./run validate`" + ("" if data["full"] else " on the repository's copies only")
    write_report(out, notes, os2, endo, cls, scan, vendor, diag, runtime, command)
    if data["full"] or args.out:
        log(f"wrote {out} in {runtime:.0f} s")
    else:
        log(f"full data sets not found in {os.path.relpath(SHARED, ROOT)}: wrote the report on the repository's "
            f"copies to {os.path.relpath(out, ROOT)} in {runtime:.0f} s ({os.path.relpath(default_report_path(True), ROOT)} "
            "is left as it is)")


if __name__ == "__main__":
    main()
