"""Scoring contract: bins, H-score, percent positive, Allred, IRS, summarize."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ihcscore.scoring import (
    COMPARTMENTS,
    ScoringScheme,
    allred_proportion_score,
    allred_score,
    assign_bins,
    headline,
    intensity_score,
    irs_percentage_score,
    irs_score,
    score_counts,
    summarize,
)

KEYS = {"n", "n_0", "n_1", "n_2", "n_3", "h_score", "percent_positive", "allred", "irs"}


# --- ScoringScheme ------------------------------------------------------------


def test_scheme_defaults_and_measurement():
    s = ScoringScheme()
    assert s.compartment == "cell" and s.statistic == "mean"
    assert s.thresholds == (0.2, 0.4, 0.6) and s.cells == "tumour"
    assert s.measurement == "Cell: DAB OD mean"
    assert ScoringScheme("nucleus", "max").measurement == "Nucleus: DAB OD max"
    assert s.measurement_for("membrane") == "Membrane: DAB OD mean"
    assert s.measurement_for("cytoplasm") == "Cytoplasm: DAB OD mean"


def test_scheme_normalises_thresholds():
    s = ScoringScheme(thresholds=[1, 2, 3])
    assert s.thresholds == (1.0, 2.0, 3.0) and all(type(t) is float for t in s.thresholds)
    assert ScoringScheme(thresholds=0.3).thresholds == (0.3,)
    assert ScoringScheme(thresholds=[0.3]).single_threshold


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"thresholds": (0.2, 0.4)}, "1 value .* or 3 values"),
        ({"thresholds": ()}, "got 0"),
        ({"thresholds": (0.2, 0.4, 0.6, 0.8)}, "got 4"),
        ({"thresholds": (0.4, 0.2, 0.6)}, "strictly increasing"),
        ({"thresholds": (0.2, 0.2, 0.6)}, "strictly increasing"),
        ({"thresholds": (0.2, float("nan"), 0.6)}, "finite"),
        ({"thresholds": (0.2, 0.4, float("inf"))}, "finite"),
        ({"thresholds": "0.2"}, "string"),
        ({"thresholds": (True,)}, "numbers"),
        ({"compartment": "nuclei"}, "compartment must be one of nucleus, cytoplasm, membrane, cell"),
        ({"statistic": "median"}, "statistic must be one of mean, max"),
        ({"cells": "tumor"}, "cells must be one of tumour, all"),
    ],
)
def test_scheme_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScoringScheme(**kwargs)


def test_scheme_is_frozen():
    with pytest.raises(Exception):
        ScoringScheme().thresholds = (0.1,)


# --- bins -----------------------------------------------------------------------


def test_assign_bins_boundaries():
    v = [0.0, 0.1999, 0.2, 0.3999, 0.4, 0.5999, 0.6, 2.0, -0.1]
    b = assign_bins(v, (0.2, 0.4, 0.6))
    assert b.dtype == np.int8
    assert b.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]


def test_assign_bins_single_threshold_and_nan():
    b = assign_bins([0.1, 0.2, 0.9, np.nan], [0.2])
    assert b.tolist() == [0, 1, 1, -1]
    b3 = assign_bins(np.array([[np.nan, 0.5], [0.7, 0.0]]), (0.2, 0.4, 0.6))
    assert b3.shape == (2, 2) and b3.tolist() == [[-1, 2], [3, 0]]
    assert assign_bins([], (0.2, 0.4, 0.6)).shape == (0,)


def test_assign_bins_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="strictly increasing"):
        assign_bins([0.1], (0.6, 0.4, 0.2))


# --- counts and H-score -----------------------------------------------------------


def test_hscore_hand_computed():
    # 10 cells: 3 negative, 3 1+, 2 2+, 2 3+ -> (3 + 4 + 6) / 10 * 100 = 130
    bins = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3], dtype=np.int8)
    r = score_counts(bins, 3)
    assert set(r) == KEYS
    assert (r["n"], r["n_0"], r["n_1"], r["n_2"], r["n_3"]) == (10, 3, 3, 2, 2)
    assert r["h_score"] == pytest.approx(130.0)
    assert r["percent_positive"] == pytest.approx(70.0)
    # positive mean bin = (3 + 4 + 6) / 7 = 13/7 = 1.857 > 5/3 -> intensity 2; 70 % -> proportion 5
    assert r["allred"] == 7
    # IRS: 70 % -> 3, times intensity 2
    assert r["irs"] == 6
    json.dumps(r)
    assert all(v is None or type(v) in (int, float) for v in r.values())


def test_hscore_extremes_and_unscored_excluded():
    assert score_counts([3, 3, 3], 3)["h_score"] == 300.0
    r = score_counts([0, 0, -1, -1], 3)
    assert r["n"] == 2 and r["h_score"] == 0.0 and r["percent_positive"] == 0.0
    assert r["allred"] == 0 and r["irs"] == 0
    # NaN cells do not dilute the score
    r = score_counts(assign_bins([0.7, np.nan, np.nan, 0.1], (0.2, 0.4, 0.6)), 3)
    assert r["n"] == 2 and r["h_score"] == 150.0 and r["percent_positive"] == 50.0


def test_zero_cells_is_none_not_zero():
    for bins in ([], [-1, -1]):
        r = score_counts(np.array(bins, dtype=np.int8), 3)
        assert r["n"] == 0 and r["n_0"] == 0
        assert r["h_score"] is None and r["percent_positive"] is None
        assert r["allred"] is None and r["irs"] is None
    r = score_counts(np.array([], dtype=np.int8), 1)
    assert r["n"] == 0 and r["percent_positive"] is None


def test_single_threshold_counts():
    r = score_counts(assign_bins([0.1, 0.25, 0.9, 0.05], [0.2]), 1)
    assert r["n"] == 4 and r["n_0"] == 2 and r["n_1"] == 2
    assert r["n_2"] is None and r["n_3"] is None
    assert r["percent_positive"] == 50.0
    assert r["h_score"] is None and r["allred"] is None and r["irs"] is None


def test_score_counts_rejects_bad_input():
    with pytest.raises(ValueError, match="-1..1"):
        score_counts([0, 2], 1)
    with pytest.raises(ValueError, match="n_thresholds"):
        score_counts([0, 1], 2)
    with pytest.raises(ValueError, match="integers"):
        score_counts([0.5, 1.0], 3)


# --- Allred and IRS -----------------------------------------------------------------


@pytest.mark.parametrize(
    "pct, score",
    [(0, 0), (0.01, 1), (0.99, 1), (1, 2), (9.99, 2), (10, 3), (32.99, 3), (33, 4),
     (65.99, 4), (66, 5), (100, 5)],
)
def test_allred_proportion_edges(pct, score):
    assert allred_proportion_score(pct) == score


@pytest.mark.parametrize(
    "mean_bin, score",
    [(None, 0), (float("nan"), 0), (1.0, 1), (5 / 3, 1), (1.67, 2), (2.0, 2), (7 / 3, 2), (2.34, 3), (3.0, 3)],
)
def test_intensity_edges(mean_bin, score):
    assert intensity_score(mean_bin) == score


def test_intensity_exact_thirds_from_counts():
    # positive bins 1,2,2 -> mean exactly 5/3 -> 1; bins 2,2,3 -> exactly 7/3 -> 2
    assert score_counts([1, 2, 2] + [0] * 7, 3)["allred"] == 3 + 1  # 30 % -> 3
    assert score_counts([2, 2, 3] + [0] * 7, 3)["allred"] == 3 + 2
    assert score_counts([2, 3, 3] + [0] * 7, 3)["allred"] == 3 + 3


def test_allred_total():
    assert allred_score(None, None) is None
    assert allred_score(0.0, None) == 0
    assert allred_score(0.5, 1.0) == 2  # minimum non-zero Allred
    assert allred_score(100.0, 3.0) == 8
    assert allred_score(50.0, 2.0) == 4 + 2
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        allred_score(101.0, 1.0)


@pytest.mark.parametrize(
    "pct, score",
    [(0, 0), (0.5, 1), (9.99, 1), (10, 2), (50, 2), (50.01, 3), (51, 3), (80, 3), (80.01, 4), (100, 4)],
)
def test_irs_percentage_edges(pct, score):
    assert irs_percentage_score(pct) == score


def test_irs_total():
    assert irs_score(None, 0) is None
    assert irs_score(0.0, 0) == 0
    assert irs_score(85.0, 3) == 12
    assert irs_score(30.0, 2) == 4
    with pytest.raises(ValueError, match="0-3"):
        irs_score(30.0, 4)


def test_counts_percent_exact_at_edges():
    # 1 positive of 100 = exactly 1 % -> Allred proportion 2; 80 of 100 = 80 % -> IRS 3 (not > 80)
    r = score_counts([1] + [0] * 99, 3)
    assert r["percent_positive"] == 1.0 and r["allred"] == 2 + 1 and r["irs"] == 1 * 1
    r = score_counts([1] * 80 + [0] * 20, 3)
    assert r["percent_positive"] == 80.0 and r["irs"] == 3 * 1 and r["allred"] == 5 + 1
    r = score_counts([3] * 10 + [0] * 90, 3)
    assert r["percent_positive"] == 10.0 and r["allred"] == 3 + 3 and r["irs"] == 2 * 3


# --- summarize ----------------------------------------------------------------------


@pytest.fixture
def table():
    return pd.DataFrame(
        {
            "class": ["tumour", "tumour", "tumour", "tumour", "other", "other"],
            "Cell: DAB OD mean": [0.1, 0.3, 0.5, 0.7, 0.65, 0.0],
            "Cell: DAB OD max": [0.3, 0.5, 0.9, 1.2, 0.9, 0.1],
            "Nucleus: DAB OD mean": [0.05, 0.05, 0.25, np.nan, 0.45, 0.0],
            "Membrane: DAB OD mean": [0.2, 0.4, 0.6, 0.8, 0.1, 0.1],
        }
    )


def test_summarize_tumour_vs_all(table):
    s = summarize(table, ScoringScheme())
    assert set(s) == {"tumour", "all"}
    t, a = s["tumour"], s["all"]
    assert set(t) == KEYS | {"by_compartment"}
    # tumour cell means 0.1 0.3 0.5 0.7 -> bins 0 1 2 3 -> H = 6/4*100
    assert (t["n"], t["n_0"], t["n_1"], t["n_2"], t["n_3"]) == (4, 1, 1, 1, 1)
    assert t["h_score"] == 150.0 and t["percent_positive"] == 75.0
    # all: + 0.65 (3+) and 0.0 (neg) -> bins 0 1 2 3 3 0 -> (1+2+6)/6*100 = 150
    assert (a["n"], a["n_0"], a["n_3"]) == (6, 2, 2)
    assert a["h_score"] == pytest.approx(150.0)
    assert a["percent_positive"] == pytest.approx(400 / 6)
    assert headline(s, ScoringScheme()) is t
    assert headline(s, ScoringScheme(cells="all")) is a
    json.dumps(s)


def test_summarize_by_compartment(table):
    s = summarize(table, ScoringScheme(compartment="nucleus"))
    bc = s["tumour"]["by_compartment"]
    assert list(bc) == list(COMPARTMENTS)
    assert bc["cytoplasm"] is None  # column missing
    # headline is the nucleus entry; NaN nucleus is unscored
    nuc = bc["nucleus"]
    assert nuc["n"] == 3 and (nuc["n_0"], nuc["n_1"]) == (2, 1)
    assert nuc["h_score"] == pytest.approx(100 / 3)
    assert {k: s["tumour"][k] for k in KEYS} == nuc
    # membrane 0.2 0.4 0.6 0.8 exactly on thresholds -> 1 2 3 3
    mem = bc["membrane"]
    assert (mem["n_0"], mem["n_1"], mem["n_2"], mem["n_3"]) == (0, 1, 1, 2)
    assert mem["h_score"] == 225.0
    assert s["all"]["by_compartment"]["membrane"]["n"] == 6


def test_summarize_max_statistic_and_single_threshold(table):
    s = summarize(table, ScoringScheme(statistic="max", thresholds=[0.5]))
    t = s["tumour"]
    assert t["n"] == 4 and t["n_1"] == 3 and t["percent_positive"] == 75.0
    assert t["h_score"] is None and t["n_2"] is None
    assert s["tumour"]["by_compartment"]["nucleus"] is None  # no "Nucleus: DAB OD max"
    assert s["tumour"]["by_compartment"]["cell"]["n_1"] == 3


def test_summarize_empty_and_no_tumour(table):
    s = summarize(table.iloc[:0], ScoringScheme())
    assert s["tumour"]["n"] == 0 and s["tumour"]["h_score"] is None
    assert s["all"]["by_compartment"]["cytoplasm"]["n"] == 0
    s = summarize(pd.DataFrame(), ScoringScheme())
    assert s["all"]["n"] == 0 and s["all"]["percent_positive"] is None
    s = summarize(table.assign(**{"class": "other"}), ScoringScheme())
    assert s["tumour"]["n"] == 0 and s["tumour"]["h_score"] is None
    assert s["tumour"]["by_compartment"]["cytoplasm"] is None  # missing column, same as "all"
    assert s["all"]["n"] == 6


def test_summarize_errors(table):
    with pytest.raises(ValueError, match="'Cytoplasm: DAB OD mean'"):
        summarize(table, ScoringScheme(compartment="cytoplasm"))
    with pytest.raises(ValueError, match="class"):
        summarize(table.drop(columns="class"), ScoringScheme())


def test_summarize_large_random_matches_numpy():
    rng = np.random.default_rng(0)
    v = rng.gamma(2.0, 0.15, 5000)
    df = pd.DataFrame({"class": np.where(rng.random(5000) < 0.6, "tumour", "other"), "Cell: DAB OD mean": v})
    s = summarize(df, ScoringScheme())
    vt = v[df["class"].to_numpy() == "tumour"]
    b = (vt >= 0.2).astype(int) + (vt >= 0.4) + (vt >= 0.6)
    assert s["tumour"]["n"] == len(vt)
    assert math.isclose(s["tumour"]["h_score"], 100 * b.mean())
    assert math.isclose(s["tumour"]["percent_positive"], 100 * (b > 0).mean())


@pytest.mark.parametrize("cells", ["tumour", "all"])
def test_score_grid_of_a_table_without_cells_is_an_empty_grid(cells):
    from ihcscore.regions import score_grid, top_hotspots

    scheme = ScoringScheme(cells=cells)
    cols = ["x0_um", "y0_um", "size_um", "n", "h_score", "percent_positive"]
    # no columns at all (what summarize() scores as null), only some, or all of them: the same empty grid
    for table in (pd.DataFrame(), pd.DataFrame({"x_um": []}),
                  pd.DataFrame({"class": [], "x_um": [], "y_um": [], "Cell: DAB OD mean": []})):
        grid = score_grid(table, scheme)
        assert list(grid.columns) == cols and len(grid) == 0
        assert top_hotspots(grid) == []
    assert summarize(pd.DataFrame(), scheme)["all"]["h_score"] is None
