"""Draw the cells ihcscore finds on scikit-image's IHC image, coloured by bin (docs/img/skimage_ihc_overlay.png).

    .venv/bin/python docs/make_overlay.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data
from skimage.segmentation import find_boundaries

from ihcscore.pipeline import analyze_region
from ihcscore.preset import load_preset
from ihcscore.report import bin_color

#: QuPath's intensity-class colours: negative, 1+, 2+, 3+.
BIN_RGB = np.array([bin_color(b) for b in range(4)], np.uint8)


def main(out=Path(__file__).resolve().parent / "img" / "skimage_ihc_overlay.png"):
    rgb = data.immunohistochemistry()
    result = analyze_region(rgb, 0.5, load_preset("cxcr4"))
    seg = result.segmentation
    bins = np.zeros(seg.n_cells + 1, int)
    bins[result.cells["label"].to_numpy()] = result.cells["bin"].to_numpy()
    overlay = rgb.copy()
    for labels in (seg.cells, seg.nuclei):
        edge = find_boundaries(labels, mode="inner")
        overlay[edge] = BIN_RGB[bins[labels[edge]]]
    both = np.concatenate([rgb, np.full((rgb.shape[0], 8, 3), 255, np.uint8), overlay], axis=1)
    Image.fromarray(both).save(out, optimize=True)
    s = result.summary["tumour"]
    print(f"wrote {out}: {len(result.cells)} cells, tumour H-score {s['h_score']:.1f}")


if __name__ == "__main__":
    main()
