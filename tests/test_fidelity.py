"""Score the right cells with the right stains: compartments, stain robustness, classifiers, regions."""

import json

import numpy as np
import pandas as pd
import pytest
import shapely
from sklearn.metrics import balanced_accuracy_score

from ihcscore.classify import (CellClassifier, labels_from_points, read_point_annotations, train_classifier)
from ihcscore.pipeline import analyze_region
from ihcscore.preset import load_preset
from ihcscore.regions import region_summaries, score_grid, top_hotspots
from ihcscore.scoring import ScoringScheme
from ihcscore.stains import StainVectors
from ihcscore.synthetic import make_synthetic_layout, make_synthetic_region, render_layout, truth_scores

THRESHOLDS = (0.2, 0.4, 0.6)


@pytest.mark.parametrize("location", ["membrane", "cytoplasm", "nucleus", "cell"])
def test_compartment_carrying_the_signal_gives_the_truth(location):
    rgb, truth, _ = make_synthetic_region((768, 768), 0.5, seed=22, dab_location=location)
    result = analyze_region(rgb, 0.5, load_preset("cxcr4").replace(compartment=location))
    true_h = truth_scores(truth, THRESHOLDS)["tumour"]["h_score"]
    by = result.summary["tumour"]["by_compartment"]
    assert abs(by[location]["h_score"] - true_h) <= 10
    if location == "membrane":
        # Membrane-only DAB is diluted in the whole cell and absent from the nucleus.
        assert by["nucleus"]["h_score"] < true_h - 50
        assert by["cell"]["h_score"] < by["membrane"]["h_score"] - 30


@pytest.fixture(scope="module")
def layout():
    return make_synthetic_layout((768, 768), 0.5, seed=5, tissue_fraction=0.7)


@pytest.mark.parametrize("scanner", [
    dict(stains=StainVectors(hematoxylin=(0.55, 0.76, 0.34), dab=(0.33, 0.60, 0.73), background=(242, 236, 246)),
         gamma=0.85),
    dict(hematoxylin_scale=0.6),
    dict(stains=StainVectors(hematoxylin=(0.72, 0.62, 0.30), dab=(0.22, 0.52, 0.82), background=(236, 240, 250))),
], ids=["other-scanner-gamma", "faded-hematoxylin", "other-vectors"])
def test_auto_stains_score_like_the_reference_rendering(layout, scanner):
    preset = load_preset("cxcr4")
    reference = analyze_region(render_layout(layout), 0.5, preset).summary["tumour"]["h_score"]
    other = render_layout(layout, **scanner)
    auto = analyze_region(other, 0.5, preset.replace(estimate_stains=True))
    assert abs(auto.summary["tumour"]["h_score"] - reference) <= 10
    if "stains" in scanner:
        # The estimated vectors point where the scanner's do (within ~5 degrees).
        for name in ("hematoxylin", "dab"):
            cos = np.dot(getattr(auto.stains, name), getattr(scanner["stains"], name))
            assert np.degrees(np.arccos(min(1.0, cos))) < 5
        # Glass as the scanner recorded it: the background through its tone curve.
        glass = 255 * (np.asarray(scanner["stains"].background) / 255) ** scanner.get("gamma", 1.0)
        assert np.allclose(auto.stains.background, glass, atol=2)


@pytest.fixture(scope="module")
def two_regions():
    preset = load_preset("cxcr4")
    out = []
    for seed in (11, 12):
        rgb, truth, _ = make_synthetic_region((768, 768), 0.5, seed=seed)
        result = analyze_region(rgb, 0.5, preset)
        labels = labels_from_points(result.cells, truth[["x_px", "y_px"]].to_numpy(), truth["class"].to_numpy(),
                                    4.0, mpp=0.5)
        out.append((truth, result, labels))
    return out


def test_trained_classifier_generalises_and_round_trips(two_regions, tmp_path):
    (_, train, train_labels), (truth, test, test_labels) = two_regions
    clf = train_classifier(train.cells, train_labels)
    path = tmp_path / "model.skops"
    clf.save(path)
    clf = CellClassifier.load(path)
    known = np.array([lab is not None for lab in test_labels])
    pred = clf.predict(test.cells)
    acc = balanced_accuracy_score(test_labels[known].astype(str), pred[known].astype(str))
    rule = balanced_accuracy_score(test_labels[known].astype(str), test.cells["class"].to_numpy()[known].astype(str))
    assert acc >= 0.9
    assert rule >= 0.85
    # Scoring with the trained classifier keeps the tumour H-score on the truth.
    rescored = analyze_region_with(test, clf)
    true_h = truth_scores(truth, THRESHOLDS)["tumour"]["h_score"]
    assert abs(rescored - true_h) <= 10


def analyze_region_with(result, clf):
    from ihcscore.scoring import summarize

    cells = result.cells.copy()
    cells["class"] = clf.predict(cells)
    return summarize(cells, load_preset("cxcr4").scoring)["tumour"]["h_score"]


def test_classifier_file_with_foreign_types_is_refused(tmp_path):
    import skops.io as sio

    path = tmp_path / "evil.skops"
    from collections import Counter

    sio.dump({"model": Counter("ab"), "feature_names": [], "format": "ihcscore-cell-classifier-1"}, str(path))
    with pytest.raises(ValueError, match="refusing"):
        CellClassifier.load(path)


def test_training_needs_both_classes(two_regions):
    _, result, _ = two_regions[0]
    with pytest.raises(ValueError, match="both classes"):
        train_classifier(result.cells, ["tumour"] * len(result.cells))


def test_point_annotations_csv_and_geojson(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("x,y,class\n10,20,tumour\n30,40,stroma\n")
    xy, cls = read_point_annotations(csv)
    assert xy.tolist() == [[10, 20], [30, 40]] and list(cls) == ["tumour", "other"]
    gj = tmp_path / "points.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
         "properties": {"classification": {"name": "Stroma"}}}]}))
    xy, cls = read_point_annotations(gj)
    assert xy.tolist() == [[1, 2], [3, 4], [5, 6]] and list(cls) == ["tumour", "tumour", "other"]


def _grid_cells():
    """Two 500 µm squares: the left all 3+, the right all negative (computed truth)."""
    rng = np.random.default_rng(0)
    n = 200
    x = np.concatenate([rng.uniform(0, 500, n), rng.uniform(500, 1000, n)])
    y = rng.uniform(0, 500, 2 * n)
    dab = np.concatenate([np.full(n, 0.8), np.full(n, 0.05)])
    return pd.DataFrame({"x_um": x, "y_um": y, "x_px": x * 2, "y_px": y * 2, "class": "tumour",
                         "Cell: DAB OD mean": dab})


def test_hotspot_grid_and_top_squares():
    grid = score_grid(_grid_cells(), ScoringScheme(), grid_um=500, min_cells=50)
    assert len(grid) == 2
    assert grid.sort_values("x0_um")["h_score"].tolist() == [300.0, 0.0]
    top = top_hotspots(grid, k=1)
    assert top[0]["x0_um"] == 0.0 and top[0]["h_score"] == 300.0 and top[0]["n"] == 200
    sparse = score_grid(_grid_cells().iloc[::10], ScoringScheme(), grid_um=500, min_cells=50)
    assert sparse["h_score"].isna().all() and top_hotspots(sparse) == []


def test_region_summaries_count_cells_inside_each_polygon():
    cells = _grid_cells()
    left = shapely.box(0, 0, 1000, 1000)  # level-0 px: the left 500 µm square at 0.5 µm/px
    out = region_summaries(cells, [("left", left), ("", shapely.box(1000, 0, 2000, 1000))], ScoringScheme(), 0.5)
    assert out[0]["name"] == "left" and out[0]["n_cells"] == 200 and out[0]["tumour"]["h_score"] == 300.0
    assert out[1]["name"] == "region 2" and out[1]["tumour"]["h_score"] == 0.0
    assert out[0]["area_mm2"] == pytest.approx(0.25)


def test_neighbourhood_features_stay_within_each_slide(two_regions):
    from ihcscore.classify import neighbourhood_features

    a, b = two_regions[0][1].cells, two_regions[1][1].cells
    both = pd.concat([a.assign(slide=0), b.assign(slide=1)], ignore_index=True)
    got = neighbourhood_features(both)
    expected = pd.concat([neighbourhood_features(a), neighbourhood_features(b)], ignore_index=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)
