"""What an installed package (no source checkout) and a fresh clone get: sample data, validation report path."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_slides"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- napari sample data, no sample_slides/


@pytest.fixture
def no_sample_slides(tmp_path, monkeypatch):
    """As in a wheel install: the sample folder exists nowhere (an empty one here), notices captured."""
    from napari_ihcscore import _sample_data

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("IHCSCORE_SAMPLE_SLIDES", str(empty))
    notes = []
    monkeypatch.setattr(_sample_data, "_notify", notes.append)
    return _sample_data, notes


def test_sample_parameters_are_make_samples_ones():
    from napari_ihcscore._sample_data import SYNTHETIC_CXCR4

    make_samples = _load(SAMPLES / "make_samples.py", "make_samples_under_test")
    want = dict(make_samples.SYNTHETIC["synthetic_cxcr4_membrane"], mpp=make_samples.MPP)
    assert SYNTHETIC_CXCR4 == want


@pytest.mark.skipif(not (SAMPLES / "synthetic_cxcr4_membrane.tif").is_file(), reason="no sample_slides/ here")
def test_synthetic_sample_without_the_file_is_the_committed_slide(no_sample_slides, tmp_path):
    import tifffile

    from ihcscore.slide import open_slide, write_pyramidal_tiff

    sd, notes = no_sample_slides
    assert sd.find_sample("synthetic_cxcr4_membrane") is None
    [(rgb, kw, kind)] = sd.sample_synthetic_cxcr4_membrane()
    assert kind == "image" and kw["rgb"] and kw["metadata"]["ihcscore_path"] is None and not notes
    committed = SAMPLES / "synthetic_cxcr4_membrane.tif"
    with open_slide(committed) as slide:
        assert kw["scale"] == (slide.mpp, slide.mpp)
        assert rgb.shape[1::-1] == tuple(slide.dimensions)
    on_disk = tifffile.imread(committed)
    assert np.abs(rgb.astype(int) - on_disk).mean() < 6  # the file is JPEG (quality 90) of these pixels
    # bit for bit once written as make_samples.py writes it (JPEG 90, 4:4:4)
    again = tmp_path / "again.tif"
    write_pyramidal_tiff(again, rgb, kw["scale"][0], compression="jpeg", quality=90)
    assert np.array_equal(tifffile.imread(again), on_disk)


def test_os2_sample_without_the_file_says_it_ships_with_a_source_checkout(no_sample_slides):
    sd, notes = no_sample_slides
    [(rgb, kw, kind)] = sd.sample_os2_ndpi()
    assert kw["name"] == "skimage_ihc" and rgb.ndim == 3  # a stand-in, named as what it is
    [note] = notes
    assert "source checkout" in note and "source repository's sample_slides/" in note
    assert "./run demo" not in note and "generate" not in note


# ----------------------------------------------------------------------------- ./run validate in a fresh clone


@pytest.fixture
def validate_module():
    return _load(ROOT / "benchmarks" / "validate.py", "validate_under_test")


def test_the_subset_validation_report_stays_untracked():
    """Without the full data sets the report goes to results/ (test below), which git must not pick up."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/validation.md"], cwd=ROOT).returncode
    if ignored != 128:  # 128: not a git checkout (an sdist)
        assert ignored == 0, "results/ must stay untracked"


@pytest.mark.parametrize("full", [False, True])
def test_validate_main_chooses_the_report_path(validate_module, monkeypatch, tmp_path, capsys, full):
    """main() without running the validations: the data found decides where the report goes."""
    v = validate_module
    shared = tmp_path / "shared" / "data" / "real"
    if full:
        shared.mkdir(parents=True)
    monkeypatch.setattr(v, "SHARED", shared)
    frame = pd.DataFrame({c: [0] for c in ("method", "tiles", "precision", "recall", "f1", "scan", "stains",
                                           "cells", "positive_pct", "positive_pct_05")})
    monkeypatch.setattr(v, "validate_os2", lambda data: frame)
    monkeypatch.setattr(v, "validate_endonuke", lambda data: (frame, None))
    monkeypatch.setattr(v, "validate_classification", lambda tables: frame)
    monkeypatch.setattr(v, "validate_scanner", lambda data: frame)
    monkeypatch.setattr(v, "stain_diagnostics", lambda data, folder: frame)
    written = {}
    monkeypatch.setattr(v, "write_report", lambda path, *a: written.update(path=Path(path), command=a[-1]))
    v.main(["--skip-cli"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert written["path"] == v.default_report_path(full)
    header = written["command"]
    assert header.startswith("`./run validate`") and header.count("`") == 2  # nothing else inside the backticks
    if full:
        assert lines[-1].startswith(f"wrote {written['path']}")
    else:
        assert "full data sets not found" in lines[-1] and "results/validation.md" in lines[-1]
        assert "docs/validation.md is left as it is" in lines[-1]
    # --out still wins
    v.main(["--skip-cli", "--out", str(tmp_path / "r.md")])
    assert written["path"] == tmp_path / "r.md"
