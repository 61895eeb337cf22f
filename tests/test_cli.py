"""`ihcscore score` end to end: the output contract, flags, bad input, blank glass."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ihcscore import __version__
from ihcscore.cli import main
from ihcscore.slide import write_pyramidal_tiff
from ihcscore.synthetic import make_synthetic_slide

SUMMARY_KEYS = {"slide", "mpp", "preset", "stain_vectors", "background_rgb", "thresholds", "compartment",
                "n_cells", "tumour", "all", "software_version", "runtime_s"}
GROUP_KEYS = {"n", "n_0", "n_1", "n_2", "n_3", "h_score", "percent_positive", "allred", "irs", "by_compartment"}
SUMMARY_CSV = ["slide", "status", "n_cells", "tumour_n", "tumour_h_score", "tumour_percent_positive",
               "tumour_allred", "tumour_irs", "all_n", "all_h_score", "all_percent_positive", "all_allred",
               "all_irs", "runtime_s"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    slides = root / "slides"
    slides.mkdir()
    make_synthetic_slide(slides / "syn.tif", shape=(640, 640), mpp=0.5, seed=3, dab_location="cell")
    write_pyramidal_tiff(slides / "glass.tif", np.full((400, 400, 3), 255, np.uint8), 0.5, compression="zlib")
    out = root / "out"
    rc = main(["score", str(slides), "--out", str(out), "--csv", "--quiet", "--tile-size", "512"])
    return slides, out, rc


def test_output_contract(scored):
    slides, out, rc = scored
    assert rc == 0
    d = out / "syn"
    summary = json.loads((d / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["preset"] == "cxcr4" and summary["compartment"] == "cell"
    assert summary["software_version"] == __version__
    for group in ("tumour", "all"):
        assert GROUP_KEYS <= set(summary[group])
        assert set(summary[group]["by_compartment"]) == {"nucleus", "cytoplasm", "membrane", "cell"}
    truth = json.loads((slides / "syn.truth.json").read_text())["scores"]
    assert abs(summary["tumour"]["h_score"] - truth["tumour"]["by_compartment"]["cell"]["h_score"]) <= 10

    cells = pd.read_parquet(d / "cells.parquet")
    assert len(cells) == summary["n_cells"]
    for col in ("x_px", "y_px", "x_um", "y_um", "class", "bin", "Nucleus: Area µm^2", "Nucleus: DAB OD mean",
                "Cell: DAB OD mean", "Membrane: DAB OD mean", "Cytoplasm: DAB OD mean"):
        assert col in cells.columns
    assert set(cells["class"]) <= {"tumour", "other"} and set(cells["bin"]) <= {0, 1, 2, 3}
    assert np.allclose(cells["x_um"], cells["x_px"] * 0.5)
    csv_cells = pd.read_csv(d / "cells.csv")
    assert list(csv_cells.columns) == list(cells.columns)

    gj = json.loads((d / "cells.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(cells)
    f = gj["features"][0]
    assert f["properties"]["objectType"] == "cell" and "nucleusGeometry" in f
    assert "report.html" in {p.name for p in d.iterdir()}

    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys())[: len(SUMMARY_CSV)] == SUMMARY_CSV
    assert {r["slide"]: r["status"] for r in rows} == {"glass": "ok", "syn": "ok"}
    assert (out / "failures.csv").read_text().strip() == "slide,path,error"
    assert (out / "index.html").is_file()


def test_blank_glass_is_an_empty_result_with_null_scores(scored):
    _, out, _ = scored
    summary = json.loads((out / "glass" / "summary.json").read_text())
    assert summary["n_cells"] == 0
    assert summary["tumour"]["h_score"] is None and summary["all"]["percent_positive"] is None
    assert len(pd.read_parquet(out / "glass" / "cells.parquet")) == 0


def test_flags_single_threshold_and_compartment(scored, tmp_path):
    slides, _, _ = scored
    out = tmp_path / "o"
    rc = main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--no-report",
               "--thresholds", "0.3", "--compartment", "nucleus", "--stains", "auto"])
    assert rc == 0
    s = json.loads((out / "syn" / "summary.json").read_text())
    assert s["thresholds"] == [0.3] and s["compartment"] == "nucleus"
    assert s["tumour"]["h_score"] is None and s["tumour"]["allred"] is None
    assert s["tumour"]["percent_positive"] is not None
    assert s["stain_vectors"]["name"] == "estimated"
    cells = pd.read_parquet(out / "syn" / "cells.parquet")
    expected = (cells["Nucleus: DAB OD mean"] >= 0.3).astype(int)
    assert (cells["bin"] == expected).all()


def test_annotations_give_per_region_scores(scored, tmp_path):
    slides, _, _ = scored
    gj = tmp_path / "regions.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "name": "left"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [320, 0], [320, 640], [0, 640], [0, 0]]]}},
        {"type": "Feature", "properties": {"objectType": "annotation", "name": "right"},
         "geometry": {"type": "Polygon", "coordinates": [[[320, 0], [640, 0], [640, 640], [320, 640], [320, 0]]]}},
    ]}))
    out = tmp_path / "o"
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--no-report",
                 "--tissue", str(gj)]) == 0
    s = json.loads((out / "syn" / "summary.json").read_text())
    names = [r["name"] for r in s["regions"]]
    assert names == ["left", "right"]
    assert sum(r["n_cells"] for r in s["regions"]) == s["n_cells"]
    assert s["regions"][0]["area_mm2"] == pytest.approx(320 * 640 * 0.25 / 1e6)


def test_mask_png_beside_the_slides_is_the_mask_not_a_slide(scored, tmp_path):
    slides, _, _ = scored
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "syn.tif").hardlink_to(slides / "syn.tif")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # the left half of the 640 px slide
    Image.fromarray(mask).save(folder / "mask.png")
    out = tmp_path / "o"
    assert main(["score", str(folder), "--out", str(out), "--quiet", "--no-report",
                 "--tissue", str(folder / "mask.png")]) == 0
    assert [r["slide"] for r in csv.DictReader(open(out / "summary.csv", newline=""))] == ["syn"]
    cells = pd.read_parquet(out / "syn" / "cells.parquet")
    assert len(cells) > 50 and cells["x_px"].max() < 320


def test_rescoring_leaves_no_file_of_the_earlier_parameters(scored, tmp_path):
    slides, _, _ = scored
    out = tmp_path / "o"
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--csv"]) == 0
    d = out / "syn"
    assert {"cells.csv", "report.html"} <= {p.name for p in d.iterdir()}
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--no-report",
                 "--thresholds", "0.3,0.5,0.7"]) == 0
    marker = json.loads((d / "_COMPLETE").read_text())
    assert sorted(p.name for p in d.iterdir()) == sorted(marker["files"] + ["_COMPLETE"])
    assert not (d / "cells.csv").exists() and not (d / "report.html").exists()


def test_image_without_pixel_size_needs_mpp(tmp_path, capsys):
    rgb = np.full((200, 200, 3), 240, np.uint8)
    png = tmp_path / "plain.png"
    Image.fromarray(rgb).save(png)
    out = tmp_path / "o"
    assert main(["score", str(png), "--out", str(out), "--quiet"]) == 1
    err = (out / "failures.csv").read_text()
    assert "plain.png" in err and "--mpp" in err
    assert main(["score", str(png), "--out", str(out), "--quiet", "--mpp", "0.5"]) == 0
    # an implausible --mpp is refused once, up front, not once per slide
    for bad in ("inf", "1e-9", "1e300", "0"):
        with pytest.raises(SystemExit) as exc:
            main(["score", str(png), "--out", str(tmp_path / "bad"), "--mpp", bad])
        assert exc.value.code == 2
        assert not (tmp_path / "bad").exists()


def test_bad_preset_and_missing_input_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[detection]\nsigmaa_um = 2\n')
    assert main(["score", str(tmp_path), "--out", str(tmp_path / "o"), "--preset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "detection.sigmaa_um" in err
    assert main(["score", str(tmp_path / "nope.svs"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.svs" in capsys.readouterr().err


def test_bad_tiling_tissue_and_out_options_stop_before_any_slide(tmp_path, capsys):
    slide = Path(__file__).parent / "data" / "real" / "CMU-1-Small-Region.svs"
    out = tmp_path / "o"
    for flags, said in ((["--tile-size", "10"], "--tile-size 10: tiles must be at least 128 px"),
                        (["--tissue", str(tmp_path / "mask.png")], "mask.png: no such mask or annotation file")):
        assert main(["score", str(slide), "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    for flags in (["--workers", "0"], ["--tile-size", "-5"]):
        with pytest.raises(SystemExit) as e:
            main(["score", str(slide), "--out", str(out), *flags])
        assert e.value.code == 2 and ">= 1" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("a file, not a folder")
    assert main(["score", str(slide), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: cannot create the output folder" in err and err.count("\n") == 1, err


def test_damaged_file_gives_one_line_and_no_reader_noise(tmp_path):
    # The first 5000 bytes of a real SVS: tifffile logs its own warning about the page offset, which
    # must not reach the user beside our one-line error.
    real = Path(__file__).parent / "data" / "real" / "CMU-1-Small-Region.svs"
    cut = tmp_path / "in" / "cut.svs"
    cut.parent.mkdir()
    cut.write_bytes(real.read_bytes()[:5000])
    out = tmp_path / "o"
    # In a child process: pytest's log capture would hide the reader's warning here.
    proc = subprocess.run([sys.executable, "-c", "import sys; from ihcscore.cli import main; sys.exit(main())",
                           "score", str(cut.parent), "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines == [f"failed: {cut}: TIFF has no images (corrupt or truncated)",
                     f"1 of 1 slides failed (see {out / 'failures.csv'})"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_train_from_points_then_score_with_the_classifier(scored, tmp_path):
    slides, _, _ = scored
    truth = pd.read_csv(slides / "syn.truth.csv")
    points = tmp_path / "points.csv"
    truth.rename(columns={"x_px": "x", "y_px": "y"})[["x", "y", "class"]].to_csv(points, index=False)
    model = tmp_path / "model.skops"
    lost = tmp_path / "no_such_folder" / "model.skops"  # refused before the cells are detected
    assert main(["train", str(slides / "syn.tif"), "--points", str(points), "--out", str(lost)]) == 2
    assert main(["train", str(slides / "syn.tif"), "--points", str(points), "--out", str(model)]) == 0
    out = tmp_path / "o"
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--no-report",
                 "--classifier", str(model)]) == 0
    s = json.loads((out / "syn" / "summary.json").read_text())
    assert s["classifier"] == str(model)
    cells = pd.read_parquet(out / "syn" / "cells.parquet")
    from scipy.spatial import cKDTree

    d, i = cKDTree(truth[["x_px", "y_px"]].to_numpy()).query(cells[["x_px", "y_px"]].to_numpy())
    near = d <= 8
    # trained and applied on the same slide: the classes follow the annotations
    assert (cells["class"].to_numpy()[near] == truth["class"].to_numpy()[i[near]]).mean() >= 0.95


def test_a_classifier_is_used_with_its_detection_and_points_must_be_the_slides(scored, tmp_path, capsys):
    """A model trained on ki67's cells scored cxcr4's without a word (accuracy fell from 1.0 to 0.86); points of
    another slide gave 'needs labelled cells of both classes'."""
    slides, _, _ = scored
    truth = pd.read_csv(slides / "syn.truth.csv")
    points = tmp_path / "points.csv"
    truth.rename(columns={"x_px": "x", "y_px": "y"})[["x", "y", "class"]].to_csv(points, index=False)
    model = tmp_path / "ki67.skops"
    assert main(["train", str(slides / "syn.tif"), "--points", str(points), "--out", str(model),
                 "--preset", "ki67"]) == 0
    capsys.readouterr()
    out = tmp_path / "o"
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--classifier", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on cells detected with other settings" in err and "sigma_um" in err
    assert main(["score", str(slides / "syn.tif"), "--out", str(out), "--quiet", "--no-report", "--preset", "ki67",
                 "--classifier", str(model)]) == 0

    far = tmp_path / "far.csv"
    pd.DataFrame({"x": [5000.0, 6000.0], "y": [5000.0, 6000.0], "class": ["tumour", "other"]}).to_csv(far, index=False)
    assert main(["train", str(slides / "syn.tif"), "--points", str(far), "--out", str(tmp_path / "m.skops")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "all 2 points lie outside" in err
    half = tmp_path / "half.csv"
    moved = truth.rename(columns={"x_px": "x", "y_px": "y"})[["x", "y", "class"]].copy()
    moved.loc[moved.index % 4 != 0, "x"] += 5000.0  # three points in four off the slide
    moved.to_csv(half, index=False)
    main(["train", str(slides / "syn.tif"), "--points", str(half), "--out", str(tmp_path / "h.skops")])
    assert "are these its points?" in capsys.readouterr().err


def test_dask_without_distributed_names_the_extra(tmp_path, monkeypatch, capsys):
    import ihcscore.batch as batch

    slide = tmp_path / "s.tif"
    write_pyramidal_tiff(slide, np.full((300, 300, 3), 255, np.uint8), 0.5, compression="zlib")

    def no_distributed(*a, **k):
        raise ImportError("No module named 'distributed'")

    monkeypatch.setattr(batch, "dask_client", no_distributed)
    assert main(["score", str(slide), "--out", str(tmp_path / "out"), "--dask", "local", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'ihcscore[distributed]'" in err and "connect" not in err
