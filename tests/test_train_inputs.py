"""Point annotation files for `ihcscore train`: what is accepted, and one-line errors for the rest."""

import json

import numpy as np
import pytest
from PIL import Image

from ihcscore.classify import read_point_annotations
from ihcscore.cli import main

FC = "FeatureCollection"


def _feature(geometry, properties=None):
    return {"type": "Feature", "geometry": geometry, "properties": properties if properties is not None else {}}


def _point(x, y, name=None):
    return _feature({"type": "Point", "coordinates": [x, y]},
                    {"classification": {"name": name}} if name is not None else {})


# --- accepted ---------------------------------------------------------------------------


def test_classification_as_a_plain_string_is_the_class_name(tmp_path):
    # older QuPath exports write "classification": "Tumor" instead of {"name": "Tumor", ...}
    f = tmp_path / "points.geojson"
    f.write_text(json.dumps({"type": FC, "features": [
        _feature({"type": "Point", "coordinates": [1, 2]}, {"classification": "Tumor"}),
        _feature({"type": "Point", "coordinates": [3, 4]}, {"classification": "Stroma"}),
        _feature({"type": "MultiPoint", "coordinates": [[5, 6], [7, 8]]}, {"classification": "tumour"}),
        _point(9, 10, "Tumor")]}))
    xy, cls = read_point_annotations(f)
    assert xy.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    assert list(cls) == ["tumour", "other", "tumour", "tumour", "tumour"]


def test_single_feature_list_of_features_and_bare_geometry(tmp_path):
    f = tmp_path / "one.geojson"
    f.write_text(json.dumps(_point(1, 2, "Tumor")))  # a Feature, not a FeatureCollection
    xy, cls = read_point_annotations(f)
    assert xy.tolist() == [[1, 2]] and list(cls) == ["tumour"]
    f.write_text(json.dumps([_point(1, 2, "Tumor"), _point(3, 4, "Other")]))
    xy, cls = read_point_annotations(f)
    assert xy.tolist() == [[1, 2], [3, 4]] and list(cls) == ["tumour", "other"]
    f.write_text(json.dumps({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4, 0]]}))
    xy, cls = read_point_annotations(f)
    assert xy.tolist() == [[1, 2], [3, 4]] and list(cls) == ["other", "other"]
    # features without points (or without a geometry) are skipped, as before
    f.write_text(json.dumps({"type": FC, "features": [
        _feature(None, None), _feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}),
        _point(5, 6, "Tumor")]}))
    xy, _ = read_point_annotations(f)
    assert xy.tolist() == [[5, 6]]


def test_csv_as_before_with_blank_lines_and_spaces(tmp_path):
    f = tmp_path / "points.csv"
    f.write_text("x,y,class\n10, 20 ,Tumor\n\n30,40,stroma\n1e2,5,1\n")
    xy, cls = read_point_annotations(f)
    assert xy.tolist() == [[10, 20], [30, 40], [100, 5]] and list(cls) == ["tumour", "other", "tumour"]
    f.write_text("x,y,class\n")  # header only: no points (training then says it needs both classes)
    xy, cls = read_point_annotations(f)
    assert xy.shape == (0, 2) and len(cls) == 0


# --- refused, in one line naming the file -----------------------------------------------

BAD_CSV = [
    (b"", "empty file; need a header x,y,class and one row per point"),
    (b"x,y,class\n10,20,tumour\n30,40,other\nabc,5,tumour\n", "row 4: x is not a number ('abc')"),
    (b"x,y,class\n10,,tumour\n", "row 2: y is empty"),
    (b"x,y,class\n,14.1,tumour\n", "row 2: x is empty"),
    (b"x,y,class\n10,nan,tumour\n", "row 2: y is not a finite number ('nan')"),
    (b"x,y,class\n10,20,tumour\n\n1,inf,other\n", "row 4: y is not a finite number ('inf')"),
    (b"x,y\n1,2\n", "missing column(s) ['class']; need x, y (level-0 px) and class"),
    (bytes(range(128, 256)), "not a text file (byte 0x80 at position 0 is not UTF-8)"),
    (b"x,y,class\n" + bytes(range(128, 256)), "not a text file (byte 0x80 at position 10 is not UTF-8)"),
]

BAD_GEOJSON = [
    ([1, 2, 3], "feature 0 is not a JSON object (1)"),
    (5, "not GeoJSON (expected a FeatureCollection, a list of features, a Feature or a geometry), got 5"),
    ({"type": FC, "features": {"a": 1}}, "'features' must be a list of features"),
    ({"type": FC, "features": [_feature({"type": "Point", "coordinates": [10]})]},
     "feature 0: coordinates must be [x, y] (finite numbers, level-0 px), got [10]"),
    ({"type": FC, "features": [_point(1, 2), _feature({"type": "Point", "coordinates": ["a", 2]})]},
     "feature 1: coordinates must be [x, y] (finite numbers, level-0 px), got [\"a\", 2]"),
    ({"type": FC, "features": [_feature({"type": "Point", "coordinates": [float("nan"), 2]})]},
     "feature 0: coordinates must be [x, y] (finite numbers, level-0 px), got [NaN, 2]"),
    ({"type": FC, "features": [_feature({"type": "MultiPoint", "coordinates": [[1, 2], [[3, 4]]]})]},
     "feature 0: point 1: coordinates must be [x, y]"),
    ({"type": FC, "features": [_feature({"type": "MultiPoint", "coordinates": 7})]},
     "feature 0: MultiPoint coordinates must be a list of [x, y] points, got 7"),
    ({"type": FC, "features": [_feature("Point")]}, "feature 0: geometry is not a JSON object (\"Point\")"),
    ({"type": FC, "features": [_feature({"type": "Point", "coordinates": [1, 2]}, ["Tumor"])]},
     "feature 0: properties is not a JSON object ([\"Tumor\"])"),
    ({"type": FC, "features": []}, "no Point features found"),
]


def _check_one_line(path, expected):
    with pytest.raises(ValueError) as e:
        read_point_annotations(path)
    msg = str(e.value)
    assert msg == f"{path}: {expected}" or msg.startswith(f"{path}: {expected}")
    assert "\n" not in msg


@pytest.mark.parametrize("content, expected", BAD_CSV)
def test_bad_csv_is_one_line_naming_file_and_row(tmp_path, content, expected):
    f = tmp_path / "points.csv"
    f.write_bytes(content)
    _check_one_line(f, expected)


@pytest.mark.parametrize("content, expected", BAD_GEOJSON)
def test_bad_geojson_is_one_line_naming_file_and_feature(tmp_path, content, expected):
    f = tmp_path / "points.geojson"
    f.write_text(json.dumps(content))
    _check_one_line(f, expected)


def test_binary_geojson_and_missing_file(tmp_path):
    f = tmp_path / "points.geojson"
    f.write_bytes(bytes(range(128, 256)))
    _check_one_line(f, "not a text file (byte 0x80 at position 0 is not UTF-8)")
    _check_one_line(tmp_path / "absent.csv", "point annotation file not found")


def test_train_command_prints_the_point_file_error_in_one_line(tmp_path, capsys):
    slide = tmp_path / "slide.png"
    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(slide)
    points = tmp_path / "points.csv"
    points.write_text("x,y,class\n10,20,tumour\nabc,5,other\n")
    model = tmp_path / "m.skops"
    assert main(["train", str(slide), "--mpp", "0.5", "--points", str(points), "--out", str(model)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {points}: row 3: x is not a number ('abc')\n"
    assert not model.exists()
    gj = tmp_path / "points.geojson"
    gj.write_text("[1, 2]")
    assert main(["train", str(slide), "--mpp", "0.5", "--points", str(gj), "--out", str(model)]) == 2
    assert capsys.readouterr().err == f"error: {gj}: feature 0 is not a JSON object (1)\n"
