"""Regenerate the sample slides in this folder (deterministic).

Run from the repository root::

    .venv/bin/python sample_slides/make_samples.py

Writes ``synthetic_cxcr4_membrane.tif``, ``synthetic_ki67_nuclear.tif`` (each
with ``.truth.csv`` and ``.truth.json``), ``skimage_ihc.tif`` and
``blank_glass.tif`` (with an empty truth). After writing, every synthetic
slide is read back through :func:`ihcscore.slide.open_slide` and the mean
deconvolved DAB OD inside each true compartment is compared with the truth, so
a lossy codec that damaged the truth is caught here (exit status 1).
``OS-2-ndpi.ome.tif`` is not made here (see its ``CREDITS`` file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ihcscore.slide import open_slide, write_pyramidal_tiff
from ihcscore.stains import H_DAB_DEFAULT, deconvolve
from ihcscore.synthetic import (
    CELL_TYPES,
    COMPARTMENTS,
    make_synthetic_layout,
    make_synthetic_slide,
    truth_scores,
)

HERE = Path(__file__).resolve().parent
MPP = 0.5
# Max |measured - true| DAB OD per cell tolerated after the JPEG round trip.
MAX_ERROR_OD = {"cell": 0.05, "nucleus": 0.05, "cytoplasm": 0.05, "membrane": 0.10}

SYNTHETIC = {
    "synthetic_cxcr4_membrane": dict(
        shape=(2048, 2048), seed=1, dab_location="membrane",
    ),
    "synthetic_ki67_nuclear": dict(
        shape=(2048, 2048), seed=2, dab_location="nucleus",
        # Ki67: a minority of tumour nuclei cycling; lymphocytes mostly resting.
        bin_probabilities={"tumour": (0.55, 0.15, 0.15, 0.15), "lymphocyte": (0.90, 0.05, 0.05, 0.0)},
    ),
}


def verify(path: Path, params: dict) -> dict:
    """Mean DAB OD measured in the truth compartments vs the painted truth."""
    kw = dict(params)
    shape, seed = kw.pop("shape"), kw.pop("seed")
    layout = make_synthetic_layout(shape, MPP, seed, **kw)
    with open_slide(path) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
    dab = deconvolve(rgb, H_DAB_DEFAULT)[..., 1]
    key = {"cell": "cells", "membrane": "membrane", "cytoplasm": "cytoplasm", "nucleus": "nuclei"}
    loc = params["dab_location"]
    truth = layout.truth
    measured = np.asarray(ndi.mean(dab, layout.labels[key[loc]], truth["label"].to_numpy()))
    err = measured - truth["dab_od"].to_numpy()
    thresholds = layout.params["thresholds"]
    bins = np.searchsorted(thresholds, measured, side="right")
    return {
        "compartment": loc,
        "mean_error_od": float(err.mean()),
        "max_abs_error_od": float(np.abs(err).max()),
        "bins_changed": int((bins != truth["bin"].to_numpy()).sum()),
        "n_cells": int(len(truth)),
    }


def make_blank(path: Path) -> None:
    write_pyramidal_tiff(path, np.full((512, 512, 3), 255, np.uint8), MPP, compression="zlib", levels=2)
    cols = ["label", "x_px", "y_px", "cell_type", "class", "dab_od", "bin", "nucleus_area_um2"]
    empty = pd.DataFrame({c: [] for c in cols + [f"dab_od_{c}" for c in COMPARTMENTS]})
    empty.to_csv(path.with_name("blank_glass.truth.csv"), index=False)
    thresholds = [0.2, 0.4, 0.6]
    meta = {
        "slide": path.name,
        "generator": "sample_slides/make_samples.py",
        "mpp": MPP,
        "shape": [512, 512],
        "thresholds": thresholds,
        "n_cells": 0,
        "n_by_type": {t: 0 for t in CELL_TYPES},
        "scores": truth_scores(empty.assign(**{"class": pd.Series([], dtype=object)}), thresholds),
        "note": "all-white glass: no tissue, no cells; H-score and percent positive are undefined (null)",
    }
    path.with_name("blank_glass.truth.json").write_text(json.dumps(meta, indent=2))


def make_skimage_ihc(path: Path) -> None:
    from skimage import data

    rgb = data.immunohistochemistry()
    # Lossless: this is the only real tissue here, keep its pixels exact.
    write_pyramidal_tiff(path, rgb, MPP, compression="zlib", levels=2,
                         extra_description={"Source": "skimage.data.immunohistochemistry",
                                            "MPPNote": "assumed"})


def main() -> int:
    ok = True
    for name, params in SYNTHETIC.items():
        path = HERE / f"{name}.tif"
        kw = dict(params)
        meta = make_synthetic_slide(path, kw.pop("shape"), MPP, kw.pop("seed"), compression="jpeg", quality=90,
                                    **kw)
        check = verify(path, params)
        t = meta["scores"]
        print(f"{path.name}: {meta['n_cells']} cells {meta['n_by_type']}, true H-score tumour "
              f"{t['tumour']['h_score']:.1f} / all {t['all']['h_score']:.1f}; JPEG check {check}")
        if check["max_abs_error_od"] > MAX_ERROR_OD[check["compartment"]] or check["bins_changed"]:
            print(f"  FAILED: JPEG round trip moved the truth of {path.name}", file=sys.stderr)
            ok = False
    make_skimage_ihc(HERE / "skimage_ihc.tif")
    print("skimage_ihc.tif: 512x512, mpp 0.5 (assumed)")
    make_blank(HERE / "blank_glass.tif")
    print("blank_glass.tif: 512x512 white")
    for p in sorted(HERE.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            print(f"  {p.name:40s} {p.stat().st_size / 1e6:7.2f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
