"""Colour deconvolution, OD conversion, stain and background estimation."""

import json

import numpy as np
import pytest

from ihcscore.stains import (
    H_DAB_DEFAULT,
    StainVectors,
    deconvolve,
    estimate_background,
    estimate_stain_vectors,
    od_to_rgb,
    rgb_to_od,
)
from ihcscore.synthetic import make_synthetic_layout, render_layout

# A scanner/stain batch unlike QuPath's default (bluer hematoxylin, redder DAB) on a cream glass.
OTHER = StainVectors(
    hematoxylin=(0.55, 0.76, 0.36),
    dab=(0.34, 0.61, 0.72),
    background=(242.0, 236.0, 246.0),
    name="other scanner",
)


def _angle_deg(u, v):
    u, v = np.asarray(u, float), np.asarray(v, float)
    c = np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))


@pytest.fixture(scope="module")
def other_region():
    layout = make_synthetic_layout((768, 768), 0.5, 4, tissue_fraction=0.6)
    # the estimators need both glass and stained tissue in view
    assert 0.2 < layout.labels["tissue"].mean() < 0.8 and len(layout.truth) > 100
    rgb = render_layout(layout, stains=OTHER, seed=4)
    return layout, rgb


def test_deconvolution_round_trip_known_vectors_and_background():
    h, d = np.meshgrid(np.linspace(0, 1.2, 121), np.linspace(0, 1.2, 121), indexing="ij")
    od = h[..., None] * np.asarray(OTHER.hematoxylin) + d[..., None] * np.asarray(OTHER.dab)
    # Unrounded intensities: exact up to float32 everywhere (nothing is clipped).
    intensity = np.asarray(OTHER.background) * 10.0 ** -od
    assert intensity.min() > 1
    out = deconvolve(intensity, OTHER)
    assert np.abs(out[..., 0] - h).max() < 1e-4
    assert np.abs(out[..., 1] - d).max() < 1e-4
    assert np.abs(out[..., 2]).max() < 1e-4
    # 8-bit: rounding costs up to 0.5 / (I ln 10) OD per channel, so judge the
    # pixels neither clipped at the glass nor darker than 64 grey levels.
    rgb = od_to_rgb(od, OTHER.background)
    out = deconvolve(rgb, OTHER)
    ok = np.all((rgb >= 64) & (rgb < 255), axis=-1)
    assert ok.sum() > 2000
    assert np.abs(out[..., 0][ok] - h[ok]).max() < 0.01
    assert np.abs(out[..., 1][ok] - d[ok]).max() < 0.01
    assert np.abs(out[..., 2][ok]).max() < 0.01


def test_deconvolution_with_wrong_vectors_mixes_stains():
    d = np.full((4, 4), 0.5)
    rgb = od_to_rgb(d[..., None] * np.asarray(OTHER.dab), OTHER.background)
    right = deconvolve(rgb, OTHER)[..., 1].mean()
    wrong = deconvolve(rgb, H_DAB_DEFAULT)[..., 1].mean()
    assert abs(right - 0.5) < 0.01
    assert abs(wrong - 0.5) > 0.02


def test_rgb_to_od_formula_and_clamp():
    bg = (250.0, 240.0, 230.0)
    rgb = np.array([[[0, 0, 0], [1, 1, 1], [100, 120, 115], [255, 255, 255]]], dtype=np.uint8)
    od = rgb_to_od(rgb, bg)
    expected = np.maximum(0.0, -np.log10(np.maximum(rgb.astype(float), 1.0) / np.asarray(bg)))
    np.testing.assert_allclose(od, expected, rtol=1e-6, atol=1e-6)
    # I = 0 is clamped to 1, so black is log10(I0), not infinity
    np.testing.assert_allclose(od[0, 0], np.log10(bg), rtol=1e-6)
    np.testing.assert_allclose(od[0, 0], od[0, 1])
    # brighter than the glass is OD 0, never negative
    assert np.all(od[0, 3] == 0)
    assert od.dtype == np.float32
    # float input takes the same formula
    np.testing.assert_allclose(rgb_to_od(rgb.astype(np.float64), bg), expected, rtol=1e-6, atol=1e-6)
    # alpha is ignored; non-RGB shapes are refused
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(rgb_to_od(rgba, bg), od)
    with pytest.raises(ValueError):
        rgb_to_od(np.zeros((4, 4, 2), np.uint8))


def test_od_to_rgb_inverts_rgb_to_od():
    rgb = np.random.default_rng(0).integers(2, 256, size=(32, 32, 3)).astype(np.uint8)
    bg = (255.0, 255.0, 255.0)
    np.testing.assert_array_equal(od_to_rgb(rgb_to_od(rgb, bg), bg), rgb)


def test_estimate_stain_vectors_recovers_other_scanner(other_region):
    _, rgb = other_region
    est = estimate_stain_vectors(rgb)
    assert _angle_deg(est.hematoxylin, OTHER.hematoxylin) < 5
    assert _angle_deg(est.dab, OTHER.dab) < 5
    # and it is closer to the truth than the defaults are
    assert _angle_deg(est.dab, OTHER.dab) < _angle_deg(H_DAB_DEFAULT.dab, OTHER.dab)
    np.testing.assert_allclose(est.background, OTHER.background, atol=1.0)


def test_estimate_background_non_white(other_region):
    _, rgb = other_region
    np.testing.assert_allclose(estimate_background(rgb), OTHER.background, atol=1.0)


def test_estimated_background_is_the_mode_of_glass():
    """DESIGN: I0 is the mode of bright glass pixels; glass at exactly that value has OD 0 (it was mode + 0.5)."""
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal((236, 236, 234), 1.2, size=(200, 200, 3)).round(), 0, 255).astype(np.uint8)
    want = tuple(float(np.argmax(np.bincount(glass[..., c].ravel(), minlength=256))) for c in range(3))
    assert estimate_background(glass) == want == (236.0, 236.0, 234.0)
    assert estimate_background(glass.astype(np.float32)) == want


def test_estimate_background_without_glass_returns_default():
    rgb = np.full((64, 64, 3), 90, np.uint8)
    assert estimate_background(rgb) == (255.0, 255.0, 255.0)


@pytest.mark.parametrize("min_brightness", [200.0, 199.9, 200 + 1 / 3, 240.5, 0.0])
def test_estimate_background_uint8_path_equals_the_float_mean(min_brightness):
    """uint8 images take a table of the per-pixel mean test and a bincount mode: the same answer as the
    float path (mean >= min_brightness, 256-bin histogram) on images around every threshold."""
    rng = np.random.default_rng(int(min_brightness * 3))
    found = []
    for low in (0, 150, 190, 230):
        rgb = rng.integers(low, 256, size=(97, 61, 3), dtype=np.uint8)
        found.append(estimate_background(rgb, min_brightness))
        assert found[-1] == estimate_background(rgb.astype(np.float64), min_brightness)
    assert any(b != (255.0, 255.0, 255.0) for b in found)  # the glass path ran


def test_estimate_stain_vectors_refuses_blank_region():
    with pytest.raises(ValueError, match="stained pixels"):
        estimate_stain_vectors(np.full((64, 64, 3), 255, np.uint8))


def test_stain_vectors_normalised_with_orthogonal_residual():
    s = StainVectors((2.0, 0.0, 0.0), (0.0, 3.0, 4.0))
    np.testing.assert_allclose(s.hematoxylin, (1, 0, 0))
    np.testing.assert_allclose(s.dab, (0, 0.6, 0.8))
    m = s.matrix
    assert m.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0)
    assert abs(np.dot(m[2], m[0])) < 1e-12 and abs(np.dot(m[2], m[1])) < 1e-12
    np.testing.assert_allclose(H_DAB_DEFAULT.hematoxylin, (0.65111, 0.70119, 0.29049), atol=1e-4)
    np.testing.assert_allclose(H_DAB_DEFAULT.dab, (0.26917, 0.56824, 0.77759), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hematoxylin=(0, 0, 0), dab=(0.27, 0.57, 0.78)), r"stain vector \[0\.0, 0\.0, 0\.0\] has zero or non-finite"),
        (dict(hematoxylin=(np.nan, 1, 1), dab=(0.27, 0.57, 0.78)), "zero or non-finite"),
        (dict(hematoxylin=(0.27, 0.57, 0.78), dab=(0.54, 1.14, 1.56)), "parallel"),
        (dict(hematoxylin=(0.65, 0.70, 0.29), dab=(0.27, 0.57, 0.78), background=(0, 255, 255)), "background"),
        (dict(hematoxylin=(0.65, 0.70, 0.29), dab=(0.27, 0.57, 0.78), background=(256, 255, 255)), "background"),
    ],
)
def test_stain_vectors_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StainVectors(**kwargs)


def test_stain_vectors_frozen():
    with pytest.raises(AttributeError):
        H_DAB_DEFAULT.dab = (1.0, 0.0, 0.0)


def test_json_round_trip(tmp_path):
    p = tmp_path / "stains.json"
    OTHER.to_json(p)
    back = StainVectors.from_json(p)
    # re-normalising an already unit vector may move its last bit
    np.testing.assert_allclose(back.matrix, OTHER.matrix, rtol=0, atol=1e-12)
    assert back.background == OTHER.background
    assert back.name == "other scanner"
    d = json.loads(p.read_text())
    assert set(d) >= {"hematoxylin", "dab", "background", "name"}
    np.testing.assert_allclose(StainVectors.from_dict(OTHER.to_dict()).matrix, OTHER.matrix, atol=1e-12)
    assert StainVectors.from_dict(H_DAB_DEFAULT.to_dict()).name == "H-DAB default"


def test_json_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        StainVectors.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        StainVectors.from_json(bad)
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"hematoxylin": [0.65, 0.70, 0.29]}))
    with pytest.raises(ValueError, match="'dab'"):
        StainVectors.from_json(incomplete)


def test_json_refuses_negative_stain_components(tmp_path):
    f = tmp_path / "stains.json"
    f.write_text(json.dumps({"hematoxylin": [0.65, 0.70, 0.29], "dab": [0.269, -0.568, 0.778]}))
    with pytest.raises(ValueError) as e:
        StainVectors.from_json(f)
    msg = str(e.value)
    assert msg == f"{f}: dab has a negative component (G = -0.568): optical density cannot be negative"
    with pytest.raises(ValueError, match=r"hematoxylin has a negative component \(R = -0\.002\)"):
        StainVectors.from_dict({"hematoxylin": [-0.002, 0.70, 0.29], "dab": [0.27, 0.57, 0.78]})
    # rounding (down to -1e-3) is taken as 0 before normalising
    f.write_text(json.dumps({"hematoxylin": [0.65, 0.70, 0.29], "dab": [-0.001, 0.6, 0.8]}))
    s = StainVectors.from_json(f)
    assert s.dab == pytest.approx((0.0, 0.6, 0.8), abs=1e-12) and min(s.dab) == 0.0
    # only vectors a user supplies are checked: the value object itself (estimates) is not
    assert StainVectors((0.65, 0.70, 0.29), (0.269, -0.568, 0.778)).dab[1] < 0


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2], "stain vectors must be a JSON object with 'hematoxylin', 'dab' and optionally 'background' "
                 "(R, G, B), got list [1, 2]"),
        ("H-DAB", "stain vectors must be a JSON object"),
        ({"hematoxylin": [0.65, 0.70, 0.29], "dab": [0.27, 0.57, 0.78], "background": [255, 255]},
         "background must be a list of 3 numbers (R, G, B, 0-255), got [255, 255]"),
        ({"hematoxylin": [0.65, 0.70, 0.29], "dab": [0.27, 0.57, 0.78], "background": 255},
         "background must be a list of 3 numbers (R, G, B, 0-255), got 255"),
        ({"hematoxylin": "abc", "dab": [0.27, 0.57, 0.78]},
         "hematoxylin must be a list of 3 numbers (R, G, B OD), got 'abc'"),
        ({"hematoxylin": [0.65, 0.70, 0.29], "dab": [0.27, "0.57", 0.78]},
         "dab must be a list of 3 numbers (R, G, B OD), got [0.27, '0.57', 0.78]"),
        ({"hematoxylin": [0.65, 0.70, 0.29], "dab": {"r": 0.27, "g": 0.57, "b": 0.78}},
         "dab must be a list of 3 numbers (R, G, B OD), got {"),
        ({"hematoxylin": [0.65, 0.70, 0.29, 0.1], "dab": [0.27, 0.57, 0.78]},
         "hematoxylin must be a list of 3 numbers"),
    ],
)
def test_json_structure_errors_name_file_and_field(tmp_path, content, message):
    f = tmp_path / "stains.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        StainVectors.from_json(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: {message}") and "\n" not in msg


def test_json_unreadable_files_name_the_file(tmp_path):
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ValueError, match=r"binary\.json: not a JSON text file \(byte 0x80 at position 0"):
        StainVectors.from_json(binary)
    with pytest.raises(ValueError, match="cannot read the stain vector file"):
        StainVectors.from_json(tmp_path)  # a folder
