"""The synthetic slide generator and its computed truth."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ihcscore import synthetic
from ihcscore.stains import H_DAB_DEFAULT, StainVectors, deconvolve
from ihcscore.synthetic import (
    make_synthetic_layout,
    make_synthetic_region,
    make_synthetic_slide,
    render_layout,
    render_with_other_scanner,
    truth_scores,
    write_large_synthetic_slide,
)

SHAPE = (640, 640)
COMPARTMENT_LABELS = {"cell": "cells", "membrane": "membrane", "cytoplasm": "cytoplasm", "nucleus": "nuclei"}


@pytest.fixture(scope="module")
def region():
    return make_synthetic_region(SHAPE, 0.5, 7, tissue_fraction=1.0)


def _mean_dab(rgb, labels, truth, compartment, stains=H_DAB_DEFAULT):
    dab = deconvolve(rgb, stains)[..., 1]
    return np.asarray(ndi.mean(dab, labels[COMPARTMENT_LABELS[compartment]], truth["label"].to_numpy()))


def test_same_seed_same_pixels_and_truth(region):
    rgb, truth, labels = region
    rgb2, truth2, labels2 = make_synthetic_region(SHAPE, 0.5, 7, tissue_fraction=1.0)
    np.testing.assert_array_equal(rgb, rgb2)
    pd.testing.assert_frame_equal(truth, truth2)
    np.testing.assert_array_equal(labels["cells"], labels2["cells"])
    rgb3, truth3, _ = make_synthetic_region(SHAPE, 0.5, 8, tissue_fraction=1.0)
    assert not np.array_equal(rgb, rgb3)


def test_truth_table_columns_and_cell_mix(region):
    rgb, truth, labels = region
    assert rgb.shape == SHAPE + (3,) and rgb.dtype == np.uint8
    for col in ("x_px", "y_px", "cell_type", "class", "dab_od", "bin", "nucleus_area_um2"):
        assert col in truth.columns
    counts = truth["cell_type"].value_counts()
    assert counts["tumour"] > 100 and counts["lymphocyte"] > 20 and counts["stroma"] > 10
    assert set(truth["class"]) == {"tumour", "other"}
    assert (truth["class"] == "tumour").sum() == counts["tumour"]
    # label k in every label image is truth row k - 1
    np.testing.assert_array_equal(truth["label"], np.arange(1, len(truth) + 1))
    for key in ("nuclei", "cells", "cytoplasm", "membrane"):
        assert labels[key].shape == SHAPE and labels[key].max() == len(truth)


def test_nucleus_sizes(region):
    _, truth, _ = region
    area = truth.groupby("cell_type")["nucleus_area_um2"].median()
    assert 45 <= area["tumour"] <= 100
    assert 15 <= area["lymphocyte"] <= 30  # 5-6 µm round nuclei
    major = truth.groupby("cell_type")["nucleus_major_um"].median()
    minor = truth.groupby("cell_type")["nucleus_minor_um"].median()
    assert major["stroma"] / minor["stroma"] > 3  # elongated


def test_nuclei_do_not_overlap_or_touch(region):
    _, truth, labels = region
    # bounding circles keep the placement gap
    xy = truth[["x_px", "y_px"]].to_numpy()
    r = truth["nucleus_major_um"].to_numpy() / 2 / 0.5
    for i, j in cKDTree(xy).query_pairs(2 * r.max() + 3):
        assert np.hypot(*(xy[i] - xy[j])) >= r[i] + r[j] + 1.5 / 0.5 - 1.5  # centroid vs centre: < 1 px each
    # and in the raster no nucleus pixel borders another nucleus
    nuc = labels["nuclei"]
    grown = ndi.grey_dilation(nuc, size=(3, 3))
    touching = (nuc > 0) & (grown != nuc)
    assert not touching.any()
    # each nucleus is whole: its raster area is the ellipse area
    expected = np.pi * truth["nucleus_major_um"] * truth["nucleus_minor_um"] / 4
    assert np.all(np.abs(truth["nucleus_area_um2"] - expected) <= 0.15 * expected + 1.0)


def test_compartments_partition_the_cells(region):
    _, truth, labels = region
    cells, nuc, cyto, mem = labels["cells"], labels["nuclei"], labels["cytoplasm"], labels["membrane"]
    assert np.all(cells[nuc > 0] == nuc[nuc > 0])
    assert np.array_equal(cyto > 0, (cells > 0) & (nuc == 0))
    assert np.all(cells[mem > 0] == mem[mem > 0])
    # cell = nucleus expanded by ~5 µm (10 px): a lone cell's area is about pi (r + 10)^2
    cell_area = np.bincount(cells.ravel(), minlength=len(truth) + 1)[1:] * 0.25
    assert np.median(cell_area / truth["nucleus_area_um2"]) > 2
    # the membrane ring is about 2 px (1 µm) wide: area ~ perimeter x 1 µm
    mem_area = np.bincount(mem.ravel(), minlength=len(truth) + 1)[1:] * 0.25
    perim = 2 * np.sqrt(np.pi * cell_area)
    ratio = mem_area / perim
    assert 0.7 < np.median(ratio) < 1.3


@pytest.mark.parametrize("thresholds", [(0.2, 0.4, 0.6), (0.3,), (0.15, 0.5)])
def test_truth_bins_match_levels_and_thresholds(thresholds):
    _, truth, _ = make_synthetic_region((384, 384), 0.5, 3, thresholds=thresholds, tissue_fraction=1.0)
    lv = truth["dab_od"].to_numpy()
    np.testing.assert_array_equal(truth["bin"], np.searchsorted(thresholds, lv, side="right"))
    assert np.abs(lv[:, None] - np.asarray(thresholds)[None, :]).min() >= 0.05 - 1e-9
    assert lv.min() >= 0
    assert truth["bin"].max() <= len(thresholds)
    # stroma negative, lymphocytes mostly top bin, tumour a mix
    assert (truth.loc[truth.cell_type == "stroma", "bin"] == 0).all()
    lym = truth.loc[truth.cell_type == "lymphocyte", "bin"]
    assert (lym == len(thresholds)).mean() > 0.6
    assert truth.loc[truth.cell_type == "tumour", "bin"].nunique() == len(thresholds) + 1


@pytest.mark.parametrize("location", ["cell", "nucleus", "cytoplasm", "membrane"])
def test_measured_dab_matches_truth_per_compartment(location):
    rgb, truth, labels = make_synthetic_region((512, 512), 0.5, 11, dab_location=location, tissue_fraction=1.0)
    measured = _mean_dab(rgb, labels, truth, location)
    err = measured - truth["dab_od"].to_numpy()
    assert np.isfinite(err).all()
    assert np.abs(err).max() < 0.05
    # the painted level is also the recorded compartment mean (before blur/noise)
    np.testing.assert_allclose(truth[f"dab_od_{location}"], truth["dab_od"], atol=1e-6)
    # and the true bins survive the rendering
    bins = np.searchsorted((0.2, 0.4, 0.6), measured, side="right")
    np.testing.assert_array_equal(bins, truth["bin"])


def test_other_compartments_unstained():
    rgb, truth, labels = make_synthetic_region((384, 384), 0.5, 5, dab_location="nucleus", tissue_fraction=1.0)
    assert np.allclose(truth["dab_od_cytoplasm"], 0)
    cyto = _mean_dab(rgb, labels, truth, "cytoplasm")
    assert np.nanmax(np.abs(cyto)) < 0.05


def test_lymphocytes_raise_the_all_cell_h_score(region):
    _, truth, _ = region
    s = truth_scores(truth)
    assert s["all"]["h_score"] > s["tumour"]["h_score"] + 5
    assert s["tumour"]["n"] == (truth["class"] == "tumour").sum()
    assert s["all"]["n"] == len(truth)


def test_truth_scores_formula():
    truth = pd.DataFrame({
        "class": ["tumour"] * 6 + ["other"] * 2,
        "dab_od": [0.1, 0.3, 0.3, 0.5, 0.7, 0.9, 0.9, 0.0],
    })
    s = truth_scores(truth, (0.2, 0.4, 0.6))
    t = s["tumour"]
    assert (t["n"], t["n_0"], t["n_1"], t["n_2"], t["n_3"]) == (6, 1, 2, 1, 2)
    assert t["h_score"] == pytest.approx((2 + 2 + 6) / 6 * 100)
    assert t["percent_positive"] == pytest.approx(5 / 6 * 100)
    assert s["all"]["n"] == 8 and s["all"]["n_3"] == 3
    one = truth_scores(truth, (0.5,))
    assert one["tumour"]["h_score"] is None
    assert one["tumour"]["percent_positive"] == pytest.approx(3 / 6 * 100)
    empty = truth_scores(truth[truth["class"] == "nobody"])
    assert empty["tumour"]["n"] == 0
    assert empty["tumour"]["h_score"] is None and empty["tumour"]["percent_positive"] is None


def test_other_scanner_keeps_the_truth():
    layout = make_synthetic_layout((384, 384), 0.5, 9, tissue_fraction=1.0)
    other = StainVectors((0.55, 0.76, 0.36), (0.34, 0.61, 0.72), background=(240, 232, 245))
    base = render_layout(layout, seed=1)
    rgb = render_with_other_scanner(layout, stains=other, seed=1)
    assert not np.array_equal(base, rgb)
    assert np.median(rgb[~layout.labels["tissue"] | (layout.labels["cells"] == 0)], axis=0)[0] < 250
    # deconvolving with the scanner's own vectors and glass recovers the same truth
    measured = _mean_dab(rgb, layout.labels, layout.truth, "cell", stains=other)
    assert np.abs(measured - layout.truth["dab_od"]).max() < 0.05
    # faded hematoxylin lowers hematoxylin, leaves DAB alone
    faded = render_with_other_scanner(layout, hematoxylin_scale=0.5, seed=1)
    nuc = layout.labels["nuclei"] > 0
    h_base = deconvolve(base)[..., 0][nuc].mean()
    h_faded = deconvolve(faded)[..., 0][nuc].mean()
    assert h_faded == pytest.approx(0.5 * h_base, rel=0.1)
    measured = _mean_dab(faded, layout.labels, layout.truth, "cell")
    assert np.abs(measured - layout.truth["dab_od"]).max() < 0.05
    # a scanner gamma brightens and changes the measured OD: same cells, different pixels
    bright = render_with_other_scanner(layout, gamma=0.8, seed=1)
    assert bright.mean() > base.mean()
    measured = _mean_dab(bright, layout.labels, layout.truth, "cell")
    assert np.median(measured / np.maximum(layout.truth["dab_od"], 0.05)) < 0.9


def test_invalid_arguments():
    with pytest.raises(ValueError, match="dab_location"):
        make_synthetic_layout((64, 64), 0.5, 0, dab_location="golgi")
    with pytest.raises(ValueError, match="thresholds"):
        make_synthetic_layout((64, 64), 0.5, 0, thresholds=(0.4, 0.2))
    with pytest.raises(ValueError, match="closer"):
        make_synthetic_layout((64, 64), 0.5, 0, thresholds=(0.2, 0.25))
    with pytest.raises(ValueError, match="bin_probabilities"):
        make_synthetic_layout((64, 64), 0.5, 0, bin_probabilities={"macrophage": (1, 0, 0, 0)})


def test_slide_files_and_truth(tmp_path):
    from ihcscore.slide import open_slide

    path = tmp_path / "syn.tif"
    meta = make_synthetic_slide(path, (512, 512), 0.5, 4, dab_location="cell", tissue_fraction=1.0)
    truth = pd.read_csv(tmp_path / "syn.truth.csv")
    on_disk = json.loads((tmp_path / "syn.truth.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["n_cells"] == len(truth) > 50
    assert on_disk["seed"] == 4 and on_disk["parameters"]["dab_location"] == "cell"
    assert on_disk["scores"]["tumour"]["h_score"] == pytest.approx(truth_scores(truth)["tumour"]["h_score"])
    assert set(on_disk["scores"]["all"]["by_compartment"]) == {"nucleus", "cytoplasm", "membrane", "cell"}
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.5)
        assert s.dimensions == (512, 512)
        assert s.level_count >= 1
        rgb = s.read_region((0, 0), 0, (512, 512))
    _, _, labels = make_synthetic_region((512, 512), 0.5, 4, tissue_fraction=1.0)
    # JPEG (q90, 4:4:4) keeps every cell's mean DAB close to its truth
    measured = _mean_dab(rgb, labels, truth, "cell")
    assert np.abs(measured - truth["dab_od"]).max() < 0.05


def test_large_slide_is_seamless_across_blocks(tmp_path):
    """Blocks rendered with halos equal one canvas painted with all the cells."""
    import tifffile

    shape = (700, 900)
    kw = dict(dab_location="membrane", noise_sd=0.0, residual_od_sd=0.0, tissue_fraction=1.0)
    meta = write_large_synthetic_slide(tmp_path / "big.tif", shape, 0.5, 5, block_px=512, compression="zlib",
                                       min_level_side=200, **kw)
    truth = pd.read_csv(tmp_path / "big.truth.csv")
    assert meta["n_cells"] == len(truth) > 100
    np.testing.assert_array_equal(truth["label"], np.arange(1, len(truth) + 1))
    with tifffile.TiffFile(tmp_path / "big.tif") as tf:
        img = tf.pages[0].asarray()
        assert [p.shape[:2] for p in tf.pages] == [(700, 900), (350, 450), (175, 225)]

    cfg, _, _ = synthetic._large_config(
        shape, 0.5, 5, 512, density_per_mm2=None, cell_expansion_um=5.0, membrane_width_um=1.0,
        thresholds=(0.2, 0.4, 0.6), bin_probabilities=None, dab_margin_od=0.05, nest_fraction=0.5,
        stains=H_DAB_DEFAULT, background=None, hematoxylin_scale=1.0, gamma=None, blur_sigma_um=0.2, **kw)
    parts = [synthetic._block_cells(cfg, by, bx) for by in range(2) for bx in range(2)]
    cells = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    hem, dab, labels = synthetic._paint_canvas(cells, cfg.fields, 0, 0, *shape, 0.5, "membrane", 5.0, 1.0)
    ref = synthetic._render(hem, dab, (slice(None), slice(None)), None, H_DAB_DEFAULT, None, 1.0, None,
                            0.0, 0.0, 0.4)
    # identical away from the image edge (the one-canvas blur pads the edge, the blocks see real halo)
    np.testing.assert_array_equal(img[3:-3, 3:-3], ref[3:-3, 3:-3])
    # and the truth is the same cells: centroids and bins
    one = synthetic._cell_table(cells, labels, dab, 0.5, 0, 0)
    assert len(one) == len(truth)
    np.testing.assert_allclose(np.sort(one["x_px"]), np.sort(truth["x_px"]), atol=1e-3)
    assert truth_scores(one)["all"] == truth_scores(truth)["all"]


def test_large_slide_aperio_pyramid_reads_level0_and_resamples(tmp_path):
    """``level_downsample=4`` stores levels 1, 4, 16 (Aperio's layout) holding the same pixels as the 2x pyramid."""
    from ihcscore.pipeline import read_detection_tile
    from ihcscore.slide import open_slide

    kw = dict(shape=(1024, 1280), mpp=0.25, seed=2, block_px=512, compression="zlib", min_level_side=60)
    write_large_synthetic_slide(tmp_path / "l2.tif", **kw)
    write_large_synthetic_slide(tmp_path / "l4.tif", level_downsample=4, **kw)
    with open_slide(tmp_path / "l2.tif") as s2, open_slide(tmp_path / "l4.tif") as s4:
        assert s2.level_downsamples == (1.0, 2.0, 4.0, 8.0, 16.0)
        assert s4.level_downsamples == (1.0, 4.0, 16.0)
        np.testing.assert_array_equal(s4.read_region((0, 0), 1, (320, 256)), s2.read_region((0, 0), 2, (320, 256)))
        np.testing.assert_array_equal(s4.read_region((0, 0), 0, (64, 64)), s2.read_region((0, 0), 0, (64, 64)))
        # at 0.5 µm/px the 2x pyramid has a level; the Aperio one is read at level 0 and resampled 2x
        a2 = read_detection_tile(s2, (100, 120, 300, 400), 2.0)
        a4 = read_detection_tile(s4, (100, 120, 300, 400), 2.0)
        assert a2.shape == a4.shape == (200, 280, 3)
        # the stored level is a 2x2 box mean, the resampling a Gaussian-weighted bilinear: close, not equal
        diff = np.abs(a2.astype(int) - a4.astype(int))
        assert diff.mean() < 2.0 and not np.array_equal(a2, a4)
    with pytest.raises(ValueError, match="level_downsample"):
        write_large_synthetic_slide(tmp_path / "l3.tif", level_downsample=3, **kw)
