"""Bars on real slides (the repository's copies; the full runs are in benchmarks/validate.py).

- OS-2 Ki67 with QuPath 0.3.2's exact settings: cell count within 10 % and positive % within 3 points
  of QuPath's at its four reference settings.
- EndoNuke (real ER/PR IHC, expert nucleus points): nucleus F1 >= 0.85 with the nuclear-marker defaults
  on the 10 tiles in tests/data/real (F1 0.861 there; 0.869 over all 141 tiles, docs/validation.md).
- H&E and fluorescence vendor files are not scored as valid H-DAB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"
OS2 = ROOT / "sample_slides" / "OS-2-ndpi.ome.tif"
sys.path.insert(0, str(ROOT / "benchmarks"))

import validate  # noqa: E402  (benchmarks/validate.py: matching, data readers, references)
from ihcscore.pipeline import analyze_region, stain_warnings  # noqa: E402
from ihcscore.preset import load_preset  # noqa: E402
from ihcscore.slide import open_slide  # noqa: E402
from ihcscore.stains import H_DAB_DEFAULT, estimate_stain_vectors  # noqa: E402


@pytest.fixture(scope="module")
def os2_rgb():
    if not OS2.is_file():
        pytest.skip(f"{OS2} missing")
    import tifffile

    return tifffile.imread(OS2)[..., :3]


@pytest.mark.parametrize("det", [0.2, 0.4])
def test_os2_matches_qupath(os2_rgb, det):
    res = analyze_region(os2_rgb, validate.OS2_MPP, load_preset("qupath-os2-ki67").replace(threshold=det))
    v = res.cells["Nucleus: DAB OD mean"].to_numpy()
    for dab in (0.2, 0.5):
        n_q, pos_q = validate.QUPATH_OS2[(det, dab)]
        pos = 100.0 * float((v >= dab).mean())
        assert abs(len(v) - n_q) <= 0.10 * n_q, (det, dab, len(v), n_q)
        assert abs(pos - pos_q) <= 3.0, (det, dab, pos, pos_q)
    # closer than the bars: guards the binary-watershed fix (was +8 % cells)
    assert abs(len(v) - validate.QUPATH_OS2[(det, 0.2)][0]) <= 0.04 * validate.QUPATH_OS2[(det, 0.2)][0]


def test_qupath_preset_has_no_ihcscore_extensions():
    d = load_preset("qupath-os2-ki67").detection
    assert d.hematoxylin_threshold == 0.0
    assert (d.image, d.sigma_um, d.threshold, d.background_radius_um) == ("od_sum", 2.0, 0.2, 0.0)


def test_endonuke_nucleus_f1():
    tiles = validate.endonuke_tiles(REAL / "endonuke")
    assert len(tiles) >= 10
    preset = load_preset("ki67")
    tp = nd = ng = 0
    for _, rgb, pts, _ in tiles:
        det, _ = validate.ihcscore_points(rgb, preset)
        tp += len(validate.match_points(pts, det, validate.MATCH_UM / validate.ENDONUKE_MPP))
        nd += len(det)
        ng += len(pts)
    p, r, f1 = validate.prf(tp, nd, ng)
    assert f1 >= 0.85, (p, r, f1)


def test_er_pr_share_ki67_detection():
    k = load_preset("ki67").detection
    assert load_preset("er").detection == k
    assert load_preset("pr").detection == k


def test_matching_is_one_to_one():
    gt = np.array([[0.0, 0.0], [10.0, 0.0]])
    det = np.array([[5.0, 0.0]])
    assert len(validate.match_points(gt, det, 8.0)) == 1
    assert validate.match_points(gt, np.array([[50.0, 50.0]]), 8.0) == []


def _he_sample():
    path = REAL / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip("CMU-1-Small-Region.svs missing")
    from ihcscore.slide import open_slide

    with open_slide(path) as s:
        return s.thumbnail(1024)


def test_he_second_stain_is_not_dab():
    """The estimated second stain of H&E (eosin) is far from DAB; on H-DAB images it is DAB."""
    he = _he_sample()
    assert float(np.dot(estimate_stain_vectors(he).dab, H_DAB_DEFAULT.dab)) < 0.96
    rgb = validate.endonuke_tiles(REAL / "endonuke")[0][1]
    assert float(np.dot(estimate_stain_vectors(rgb).dab, H_DAB_DEFAULT.dab)) > 0.98


def test_he_slide_gets_stain_warning():
    warnings = stain_warnings(_he_sample(), H_DAB_DEFAULT, "CMU-1-Small-Region")
    assert any("CMU-1-Small-Region" in w and "away from DAB" in w for w in warnings)


def test_ihc_slides_get_no_stain_warning():
    for path in (ROOT / "sample_slides" / "OS-2-ndpi.ome.tif", ROOT / "sample_slides" / "skimage_ihc.tif"):
        with open_slide(path) as s:
            w, h = s.dimensions
            assert stain_warnings(s.read_region((0, 0), 0, (min(w, 1024), min(h, 1024))), H_DAB_DEFAULT, s.name) == []


def test_fluorescence_ndpi_not_scored(tmp_path):
    path = REAL / "stritt-test3-DAPI.ndpi"
    if not path.is_file():
        pytest.skip("stritt-test3-DAPI.ndpi missing")
    from ihcscore.cli import main

    rc = main(["score", str(path), "--out", str(tmp_path), "--preset", "ki67", "--quiet", "--no-report"])
    summary = tmp_path / path.stem / "summary.json"
    warned = summary.is_file() and json.loads(summary.read_text()).get("warnings")
    assert rc != 0 or warned
    if rc != 0:
        assert "fluorescence" in (tmp_path / "failures.csv").read_text()


def test_sparse_nuclear_dab_slide_is_not_taken_for_he():
    """Ki67-like slides (DAB only in nuclei, always mixed with hematoxylin) give no stain warning."""
    from ihcscore.pipeline import analyze_slide

    with open_slide(ROOT / "sample_slides" / "synthetic_ki67_nuclear.tif") as s:
        result = analyze_slide(s, load_preset("ki67"), tile_size=1024)
    assert result.summary["warnings"] == []
