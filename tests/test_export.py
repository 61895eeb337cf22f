"""Tests for ihcscore.export: atomic writes, cell tables, QuPath GeoJSON, summaries."""

import csv
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from ihcscore import export
from ihcscore.export import (
    SUMMARY_CSV_COLUMNS,
    atomic_open,
    atomic_write,
    cells_to_geojson,
    hash_params,
    is_complete,
    qupath_class_name,
    read_cells_geojson,
    summary_row,
    write_cells_csv,
    write_cells_geojson,
    write_cells_parquet,
    write_failures_csv,
    write_slide_outputs,
    write_summary_csv,
    write_summary_json,
)

MPP = 0.5
CONTRACT_SUMMARY_COLUMNS = [
    "slide", "status", "n_cells", "tumour_n", "tumour_h_score", "tumour_percent_positive",
    "tumour_allred", "tumour_irs", "all_n", "all_h_score", "all_percent_positive", "all_allred",
    "all_irs", "runtime_s",
]


def square(x, y, r):
    return np.array([[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]], float)


def make_cells(n=6, polygons=True):
    rng = np.random.default_rng(1)
    x = 100 + 40 * np.arange(n, dtype=float)
    y = 200 + 10 * np.arange(n, dtype=float)
    df = pd.DataFrame({
        "x_px": x, "y_px": y, "x_um": x * MPP, "y_um": y * MPP,
        "class": ["tumour", "other"] * (n // 2) + ["tumour"] * (n % 2),
        "bin": np.array([0, 1, 2, 3, -1, 2][:n] + [0] * max(0, n - 6), dtype=np.int8),
        "Nucleus: Area µm^2": rng.uniform(20, 60, n),
        "Nucleus: DAB OD mean": rng.uniform(0, 1, n),
        "Nucleus: Perimeter µm": rng.uniform(15, 30, n),
        "Cell: Area µm^2": rng.uniform(80, 150, n),
        "Cell: DAB OD mean": rng.uniform(0, 1, n),
        "Membrane: DAB OD mean": rng.uniform(0, 1, n),
        "Cytoplasm: DAB OD mean": rng.uniform(0, 1, n),
    })
    df.loc[1, "Membrane: DAB OD mean"] = np.nan
    if polygons:
        df["nucleus_polygon"] = [square(a, b, 4) for a, b in zip(x, y)]
        df["cell_polygon"] = [square(a, b, 9) if i != 2 else None for i, (a, b) in enumerate(zip(x, y))]
    return df


def make_summary():
    grp = {"n": 4, "n_0": 1, "n_1": 1, "n_2": 1, "n_3": 1, "h_score": 150.0, "percent_positive": 75.0,
           "allred": 7, "irs": 8}
    return {
        "slide": "S1", "mpp": MPP, "preset": "cxcr4",
        "stain_vectors": {"hematoxylin": [0.65111, 0.70119, 0.29049], "dab": [0.26917, 0.56824, 0.77759]},
        "background_rgb": [255, 255, 255], "thresholds": [0.2, 0.4, 0.6], "compartment": "cell",
        "n_cells": 6,
        "tumour": dict(grp, by_compartment={c: dict(grp) for c in ("nucleus", "cytoplasm", "membrane", "cell")}),
        "all": dict(grp, n=6, h_score=float("nan"), by_compartment={}),
        "software_version": "0.2.0", "runtime_s": 1.5, "warnings": ["few cells"],
    }


# --------------------------------------------------------------------------- atomic
def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"

    def bad(p):
        p.write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, bad)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_open(target) as f:
            f.write("new partial")
            raise ValueError
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_success_and_tmp_name(tmp_path):
    target = tmp_path / "b.txt"
    seen = []

    def w(p):
        seen.append(p)
        p.write_text("hello")

    atomic_write(target, w)
    assert target.read_text() == "hello"
    assert seen[0].name == f"b.txt.tmp-{os.getpid()}" and seen[0].parent == tmp_path
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- tables
def test_parquet_and_csv_round_trip_exact_columns(tmp_path):
    cells = make_cells()
    write_cells_parquet(tmp_path / "cells.parquet", cells)
    write_cells_csv(tmp_path / "cells.csv", cells)
    expected = [c for c in cells.columns if c not in ("nucleus_polygon", "cell_polygon")]
    pq = pd.read_parquet(tmp_path / "cells.parquet")
    cs = pd.read_csv(tmp_path / "cells.csv", encoding="utf-8")
    assert list(pq.columns) == expected
    assert list(cs.columns) == expected
    assert "Nucleus: Area µm^2" in cs.columns
    # DESIGN's order whatever the table's: position, class, bin, then the measurements
    shuffled = cells[list(reversed(cells.columns))]
    write_cells_csv(tmp_path / "shuffled.csv", shuffled)
    head = list(pd.read_csv(tmp_path / "shuffled.csv", nrows=0).columns)
    lead = [c for c in ("object_id", "label") if c in cells.columns]
    assert head[:len(lead) + 6] == lead + ["x_px", "y_px", "x_um", "y_um", "class", "bin"]
    assert sorted(head) == sorted(expected)
    raw_header = (tmp_path / "cells.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "Nucleus: Area µm^2" in raw_header
    pd.testing.assert_frame_equal(pq, cells[expected])
    pd.testing.assert_frame_equal(cs, cells[expected], check_dtype=False)


def test_parquet_in_row_groups_reads_back_as_pandas_writes_it(tmp_path, monkeypatch):
    """The chunked writer gives the frame, schema and pandas metadata of ``to_parquet(index=False)``."""
    import pyarrow.parquet as papq

    cells = make_cells()
    cells.index = np.arange(len(cells)) * 3 + 5  # a slide table's index must not leak into the file
    rows = max(1, len(cells) // 3)
    monkeypatch.setattr(export, "PARQUET_ROWS", rows)
    write_cells_parquet(tmp_path / "cells.parquet", cells)
    expected = cells.drop(columns=["nucleus_polygon", "cell_polygon"]).reset_index(drop=True)
    expected.to_parquet(tmp_path / "pandas.parquet", index=False)
    assert papq.read_metadata(tmp_path / "cells.parquet").num_row_groups == -(-len(cells) // rows) > 1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cells.parquet"), expected, check_exact=True)
    ours, theirs = papq.read_schema(tmp_path / "cells.parquet"), papq.read_schema(tmp_path / "pandas.parquet")
    assert ours.equals(theirs, check_metadata=True)
    write_cells_parquet(tmp_path / "empty.parquet", cells.iloc[:0])
    assert list(pd.read_parquet(tmp_path / "empty.parquet").columns) == list(expected.columns)


def test_geojson_bytes_do_not_depend_on_the_block_size(tmp_path, monkeypatch):
    """Features are encoded a block of rows at a time: blocks of 2 rows give the same file."""
    cells = make_cells(n=7)
    cells.loc[3, "Cell: DAB OD mean"] = np.nan  # a non-finite value is left out of its feature
    write_cells_geojson(tmp_path / "one.geojson", cells, MPP, seed=4)
    monkeypatch.setattr(export, "GEOJSON_ROWS", 2)
    write_cells_geojson(tmp_path / "blocks.geojson", cells, MPP, seed=4)
    assert (tmp_path / "one.geojson").read_bytes() == (tmp_path / "blocks.geojson").read_bytes()
    features = json.loads((tmp_path / "blocks.geojson").read_text(encoding="utf-8"))["features"]
    assert "Cell: DAB OD mean" not in features[3]["properties"]["measurements"]
    assert features[4]["properties"]["measurements"]["Cell: DAB OD mean"] == cells.loc[4, "Cell: DAB OD mean"]


def test_geojson_in_worker_processes_gives_the_same_bytes(tmp_path, monkeypatch):
    """Blocks of features encoded in 2 processes are written in order: the file of one process, id for id."""
    cells = make_cells(n=11)
    cells.loc[5, "Cell: DAB OD mean"] = np.nan
    write_cells_geojson(tmp_path / "one.geojson", cells, MPP, seed=9)
    monkeypatch.setattr(export, "GEOJSON_ROWS", 3)  # 4 blocks; inherited by the forked workers
    write_cells_geojson(tmp_path / "two.geojson", cells, MPP, seed=9, workers=2)
    assert (tmp_path / "one.geojson").read_bytes() == (tmp_path / "two.geojson").read_bytes()
    assert len(json.loads((tmp_path / "two.geojson").read_text(encoding="utf-8"))["features"]) == 11
    broken = cells.copy()
    broken["nucleus_polygon"] = None
    broken.loc[7, "x_px"] = np.nan
    with pytest.raises(ValueError, match="cell 7 has no nucleus polygon"):
        write_cells_geojson(tmp_path / "broken.geojson", broken, MPP, seed=9, workers=2)
    assert not (tmp_path / "broken.geojson").exists()


# --------------------------------------------------------------------------- geojson
def test_class_names():
    assert qupath_class_name("tumour", 3) == "Tumor: 3+"
    assert qupath_class_name("tumour", 0) == "Tumor: Negative"
    assert qupath_class_name("other", 1) == "Other: 1+"
    assert qupath_class_name("tumour", -1) == "Tumor"
    assert qupath_class_name("tumour", 1, n_thresholds=1) == "Tumor: Positive"


def test_geojson_structure_matches_table(tmp_path):
    cells = make_cells()
    path = write_cells_geojson(tmp_path / "cells.geojson", cells, MPP, seed=0)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    feats = data["features"]
    assert len(feats) == len(cells)
    ids = set()
    for i, f in enumerate(feats):
        assert f["type"] == "Feature"
        ids.add(f["id"])
        props = f["properties"]
        assert props["objectType"] == "cell"
        assert props["isLocked"] is False
        name = qupath_class_name(cells["class"][i], cells["bin"][i])
        assert props["classification"]["name"] == name
        assert len(props["classification"]["color"]) == 3
        for key in ("geometry", "nucleusGeometry"):
            g = f[key]
            assert g["type"] == "Polygon"
            ring = g["coordinates"][0]
            assert ring[0] == ring[-1] and len(ring) >= 4
        meas = props["measurements"]
        for col in ("Nucleus: Area µm^2", "Cell: DAB OD mean", "Nucleus: DAB OD mean"):
            assert meas[col] == cells[col][i]
        assert meas["Centroid X µm"] == cells["x_um"][i]
        assert "bin" not in meas and "x_px" not in meas
        if i == 1:
            assert "Membrane: DAB OD mean" not in meas  # NaN left out
    assert len(ids) == len(cells)
    # colours are QuPath's intensity colours
    assert feats[3]["properties"]["classification"]["color"] == [200, 50, 50]
    assert feats[0]["properties"]["classification"]["color"] == [90, 90, 180]
    # the cell without a cell polygon uses its nucleus polygon
    assert feats[2]["geometry"] == feats[2]["nucleusGeometry"]
    # the cell polygon is the geometry when present
    assert np.allclose(np.array(feats[0]["geometry"]["coordinates"][0])[:4], square(100, 200, 9))


def test_geojson_round_trip(tmp_path):
    cells = make_cells()
    write_cells_geojson(tmp_path / "c.geojson", cells, MPP)
    back = read_cells_geojson(tmp_path / "c.geojson", mpp=MPP)
    assert list(back["class"]) == list(cells["class"])
    assert list(back["bin"]) == list(cells["bin"])
    np.testing.assert_allclose(back["x_px"], cells["x_px"])
    np.testing.assert_allclose(back["y_um"], cells["y_um"])
    for col in ("Nucleus: Area µm^2", "Cell: DAB OD mean", "Membrane: DAB OD mean"):
        np.testing.assert_array_equal(back[col].to_numpy(), cells[col].to_numpy())
    np.testing.assert_allclose(back["nucleus_polygon"][0][:4], square(100, 200, 4))
    # without mpp: centroid of the nucleus polygon
    back2 = read_cells_geojson(tmp_path / "c.geojson")
    np.testing.assert_allclose(back2["x_px"], cells["x_px"])


def test_geojson_without_polygons_uses_area_circles(tmp_path):
    cells = make_cells(polygons=False)
    fc = cells_to_geojson(cells, MPP)
    from shapely.geometry import shape

    for f, (_, row) in zip(fc["features"], cells.iterrows()):
        nuc = shape(f["nucleusGeometry"])
        cel = shape(f["geometry"])
        assert nuc.area * MPP**2 == pytest.approx(row["Nucleus: Area µm^2"], rel=0.05)
        assert cel.area * MPP**2 == pytest.approx(row["Cell: Area µm^2"], rel=0.05)
        assert nuc.centroid.x == pytest.approx(row["x_px"])
        assert f["geometry"]["coordinates"][0][0] == f["geometry"]["coordinates"][0][-1]


def test_geojson_qupath_03_format(tmp_path):
    cells = make_cells(3)
    fc = cells_to_geojson(cells, MPP, qupath_version="0.3")
    p = fc["features"][2]["properties"]
    assert p["object_type"] == "cell"
    assert isinstance(p["measurements"], list) and {"name", "value"} <= set(p["measurements"][0])
    assert p["classification"]["name"] == "2+"
    assert p["classification"]["parentClass"]["name"] == "Tumor"
    (tmp_path / "old.geojson").write_text(json.dumps(fc))
    back = read_cells_geojson(tmp_path / "old.geojson", mpp=MPP)
    assert list(back["bin"]) == [0, 1, 2]
    assert list(back["class"]) == ["tumour", "other", "tumour"]


# --------------------------------------------------------------------------- summary
def test_summary_json_nan_and_numpy(tmp_path):
    s = make_summary()
    s["extra"] = {"a": np.float32(1.5), "b": np.int64(3), "c": np.array([1, 2]), "d": None,
                  "e": float("inf"), "f": np.nan}
    write_summary_json(tmp_path / "summary.json", s)
    text = (tmp_path / "summary.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["all"]["h_score"] is None
    assert data["extra"] == {"a": 1.5, "b": 3, "c": [1, 2], "d": None, "e": None, "f": None}
    assert data["tumour"]["by_compartment"]["cell"]["h_score"] == 150.0


def test_summary_csv_columns_and_values(tmp_path):
    s = make_summary()
    rows = [summary_row(s, "ok", 2.5),
            summary_row(None, "failed", 0.1, error="cannot open", slide="S2")]
    assert list(SUMMARY_CSV_COLUMNS[:14]) == CONTRACT_SUMMARY_COLUMNS
    write_summary_csv(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", encoding="utf-8", newline="") as f:
        rd = list(csv.reader(f))
    assert rd[0][:14] == CONTRACT_SUMMARY_COLUMNS
    assert rd[0] == list(SUMMARY_CSV_COLUMNS)
    df = pd.read_csv(tmp_path / "summary.csv")
    assert df.loc[0, "tumour_h_score"] == 150.0
    assert math.isnan(df.loc[0, "all_h_score"])
    assert df.loc[0, "runtime_s"] == 2.5
    assert df.loc[0, "warnings"] == "few cells"
    assert df.loc[1, "slide"] == "S2" and df.loc[1, "error"] == "cannot open"
    assert df.loc[0, "preset"] == s["preset"] and df.loc[0, "software_version"] == s["software_version"]


def test_append_summary_row_replaces_same_slide(tmp_path):
    export.append_summary_row(tmp_path, summary_row(make_summary(), "ok", 1.0))
    s2 = make_summary()
    s2["tumour"]["h_score"] = 99.0
    export.append_summary_row(tmp_path, summary_row(s2, "ok", 1.0))
    export.append_summary_row(tmp_path, summary_row(None, "failed", slide="S9", error="x"))
    df = pd.read_csv(tmp_path / "summary.csv")
    assert list(df["slide"]) == ["S1", "S9"]
    assert df.loc[0, "tumour_h_score"] == 99.0


def test_failures_csv(tmp_path):
    write_failures_csv(tmp_path / "failures.csv",
                       [("S2", tmp_path / "S2.svs", "SlideError: bad\nfile"), {"slide": "S3", "path": "p", "error": "e"}])
    df = pd.read_csv(tmp_path / "failures.csv")
    assert list(df.columns) == ["slide", "path", "error"]
    assert df.loc[0, "error"] == "SlideError: bad file"
    write_failures_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text().strip() == "slide,path,error"


# --------------------------------------------------------------------------- slide folder
def test_write_slide_outputs_and_is_complete(tmp_path):
    out = tmp_path / "S1"
    h = hash_params({"preset": "cxcr4", "thresholds": [0.2, 0.4, 0.6]})
    assert not is_complete(out, h)
    written = write_slide_outputs(out, make_summary(), make_cells(), MPP, csv=True, report=False, params_hash=h)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["_COMPLETE", "cells.csv", "cells.geojson", "cells.parquet", "summary.json"]
    assert written["complete"].name == "_COMPLETE"
    assert is_complete(out, h)
    assert not is_complete(out, hash_params({"preset": "ki67"}))
    assert not is_complete(out, None)
    # a listed file missing -> incomplete
    (out / "cells.geojson").unlink()
    assert not is_complete(out, h)
    # no marker -> incomplete
    write_slide_outputs(out, make_summary(), make_cells(), MPP, report=False, params_hash=h)
    assert is_complete(out, h)
    (out / "_COMPLETE").unlink()
    assert not is_complete(out, h)


def test_write_slide_outputs_failure_removes_old_marker(tmp_path, monkeypatch):
    out = tmp_path / "S1"
    write_slide_outputs(out, make_summary(), make_cells(), MPP, report=False, params_hash="h")
    assert is_complete(out, "h")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_cells_geojson", boom)
    with pytest.raises(OSError):
        write_slide_outputs(out, make_summary(), make_cells(), MPP, report=False, params_hash="h")
    assert not is_complete(out, "h")
    assert not any(".tmp-" in p.name for p in out.iterdir())


def test_write_slide_outputs_with_report(tmp_path):
    out = tmp_path / "S1"
    write_slide_outputs(out, make_summary(), make_cells(), MPP, report=True, params_hash="x")
    assert (out / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "report.html" in json.loads((out / "_COMPLETE").read_text())["files"]
