"""Presets: packaged files, TOML round trip, validation messages, CLI overrides."""

import dataclasses
import json
import tomllib

import pytest

from ihcscore.cells import DetectionParams
from ihcscore.preset import Preset, StainSettings, available_presets, load_preset
from ihcscore.scoring import ScoringScheme
from ihcscore.stains import H_DAB_DEFAULT, StainVectors

DETECTION_KEYS = {f.name for f in dataclasses.fields(DetectionParams)}


def test_available_presets():
    names = available_presets()
    assert {"cxcr4", "ki67", "qupath-os2-ki67"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", available_presets())
def test_packaged_preset_has_every_key_and_round_trips(name, tmp_path):
    p = load_preset(name)
    assert p.name == name
    # every key written out in the packaged file (a user copies and edits it)
    from importlib import resources

    raw = tomllib.loads(resources.files("ihcscore").joinpath("presets", f"{name}.toml").read_text("utf-8"))
    assert set(raw) == {"name", "stains", "detection", "scoring"}
    assert set(raw["stains"]) == {"estimate", "hematoxylin", "dab", "background"}
    assert set(raw["detection"]) == DETECTION_KEYS
    assert set(raw["scoring"]) == {"compartment", "statistic", "thresholds", "cells"}
    # round trip through to_toml
    f = tmp_path / "copy.toml"
    f.write_text(p.to_toml(), encoding="utf-8")
    q = load_preset(f)
    assert q == p
    assert q.source == str(f)
    json.dumps(p.to_dict())


def test_cxcr4_preset():
    p = load_preset("cxcr4")
    assert p.detection.image == "hematoxylin" and p.detection.exclude_dab is False
    assert p.scoring == ScoringScheme("cell", "mean", (0.2, 0.4, 0.6), "tumour")
    assert p.stains.to_stain_vectors() == H_DAB_DEFAULT
    assert p.stains.to_stain_vectors().name == "H-DAB default"


def test_ki67_preset():
    p = load_preset("ki67")
    assert p.detection.image == "od_sum" and not p.detection.exclude_dab
    assert p.scoring.compartment == "nucleus" and p.scoring.thresholds[0] == 0.2


def test_qupath_os2_preset_matches_provenance():
    p = load_preset("qupath-os2-ki67")
    assert p.detection == DetectionParams(
        image="od_sum", exclude_dab=False, pixel_size_um=0.5, background_radius_um=0.0,
        median_radius_um=0.0, sigma_um=2.0, threshold=0.2, min_area_um2=10.0, max_area_um2=400.0,
        max_background=2.0, split_by_shape=True, cell_expansion_um=0.0, membrane_width_um=1.0,
    )
    assert p.scoring == ScoringScheme("nucleus", "mean", (0.2,), "all")
    assert p.scoring.measurement == "Nucleus: DAB OD mean"
    assert p.stains == StainSettings() and not p.stains.estimate


def test_missing_keys_take_defaults(tmp_path):
    f = tmp_path / "mini.toml"
    f.write_text('[scoring]\nthresholds = [0.3]\n')
    p = load_preset(f)
    assert p.name == "mini"  # file stem when no name key
    assert p.detection == DetectionParams()
    assert p.stains == StainSettings()
    assert p.scoring == ScoringScheme(thresholds=(0.3,))
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert load_preset(str(empty)) == Preset("empty")


@pytest.mark.parametrize(
    "text, match",
    [
        ("[detection]\nfoo = 1\n", "unknown key 'detection.foo'"),
        ("[scoring]\nthreshold = [0.2]\n", "unknown key 'scoring.threshold'"),
        ("[stains]\nvectors = 1\n", "unknown key 'stains.vectors'"),
        ("colour = 1\n", "unknown key 'colour'"),
        ("[detecton]\nimage = 'od_sum'\n", "unknown key 'detecton'"),
        ("[detection.sub]\nx = 1\n", "unknown key 'detection.sub'"),
        ("[detection]\nsigma_um = 'big'\n", "detection.sigma_um must be a finite number"),
        ("[detection]\nsigma_um = -1.0\n", "detection.sigma_um must be >= 0"),
        ("[detection]\npixel_size_um = 0\n", "detection.pixel_size_um must be > 0"),
        ("[detection]\nsplit_by_shape = 1\n", "detection.split_by_shape must be true or false"),
        ("[detection]\nimage = 'dab'\n", "detection.image must be one of"),
        ("[detection]\nmin_area_um2 = 500.0\n", "detection.min_area_um2"),
        ("[scoring]\nthresholds = [0.4, 0.2, 0.6]\n", "scoring.thresholds: .*strictly increasing"),
        ("[scoring]\nthresholds = [0.2, 0.4]\n", "scoring.thresholds"),
        ("[scoring]\ncompartment = 'nuclei'\n", "scoring.compartment must be one of"),
        ("[scoring]\ncells = 'tumor'\n", "scoring.cells must be one of"),
        ("[stains]\ndab = [1, 2]\n", "stains.dab must be a list of 3"),
        ("[stains]\nestimate = 'yes'\n", "stains.estimate must be true or false"),
        ("[stains]\nbackground = [255, 255, 0]\n", "stains.background"),
        ("[stains]\ndab = [0.65111, 0.70119, 0.29049]\n", "parallel"),
        ("[stains]\ndab = [0.269, -0.568, 0.778]\n",
         r"stains\.dab has a negative component \(G = -0\.568\): optical density cannot be negative"),
        ("[stains]\nhematoxylin = [-0.65, 0.70, 0.29]\n", r"stains\.hematoxylin has a negative component \(R = -0\.65\)"),
        ("[stains]\ndab = [0.27, 0.57, -0.0011]\n", r"stains\.dab has a negative component \(B = -0\.0011\)"),
        ("detection = 3\n", "detection must be a table"),
        ("name = 3\n", "name must be a non-empty string"),
        ("[scoring\n", "not valid TOML"),
    ],
)
def test_bad_preset_errors_name_file_and_key(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        load_preset(f)
    assert str(e.value).startswith(f"{f}: ")


def test_rounding_negatives_in_preset_vectors_are_taken_as_zero(tmp_path):
    f = tmp_path / "rounded.toml"
    f.write_text("[stains]\nhematoxylin = [0.65, 0.70, 0.29]\ndab = [-0.001, 0.6, 0.8]\n")
    p = load_preset(f)
    assert p.stains.dab == (0.0, 0.6, 0.8)
    assert p.stains.to_stain_vectors().dab == pytest.approx((0.0, 0.6, 0.8), abs=1e-12)
    back = tmp_path / "back.toml"
    back.write_text(p.to_toml(), encoding="utf-8")
    assert load_preset(back) == p


def test_unknown_preset_name_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*cxcr4"):
        load_preset("nope")
    with pytest.raises(ValueError, match="not found"):
        load_preset(tmp_path / "absent.toml")


def test_replace_overrides():
    p = load_preset("cxcr4")
    q = p.replace(thresholds=[0.3], compartment="membrane", estimate_stains=True, pixel_size_um=0.25)
    assert q.scoring == ScoringScheme("membrane", "mean", (0.3,), "tumour")
    assert q.stains.estimate is True and q.detection.pixel_size_um == 0.25
    assert q.detection.exclude_dab == p.detection.exclude_dab  # untouched
    assert p.scoring.thresholds == (0.2, 0.4, 0.6)  # original unchanged
    assert p.replace() == p
    sv = StainVectors((0.6, 0.7, 0.3), (0.3, 0.6, 0.8), background=(240, 241, 242))
    r = p.replace(stain_vectors=sv)
    got = r.stains.to_stain_vectors()
    assert got.dab == pytest.approx(sv.dab, abs=1e-15) and got.hematoxylin == pytest.approx(sv.hematoxylin, abs=1e-15)
    assert got.background == (240.0, 241.0, 242.0) and r.stains.estimate is False
    assert r.stains.to_stain_vectors().name == "preset"
    with pytest.raises(ValueError, match="unknown key 'detection.foo'"):
        p.replace(foo=1)
    with pytest.raises(ValueError, match="scoring.thresholds"):
        p.replace(thresholds=[0.5, 0.1, 0.9])
    with pytest.raises(ValueError, match="detection.sigma_um"):
        p.replace(sigma_um=-2)


def test_replaced_preset_round_trips(tmp_path):
    p = load_preset("ki67").replace(name="ki67 custom \"quoted\"", thresholds=0.35, cells="all",
                                     stain_vectors=StainVectors((0.6, 0.7, 0.3), (0.3, 0.6, 0.8), (240.5, 241, 242)))
    f = tmp_path / "custom.toml"
    f.write_text(p.to_toml(), encoding="utf-8")
    assert load_preset(f) == p


def test_to_dict():
    d = load_preset("qupath-os2-ki67").to_dict()
    assert d["name"] == "qupath-os2-ki67"
    assert d["scoring"] == {"compartment": "nucleus", "statistic": "mean", "thresholds": [0.2], "cells": "all"}
    assert d["detection"]["sigma_um"] == 2.0 and d["detection"]["image"] == "od_sum"
    assert d["stains"]["background"] == [255.0, 255.0, 255.0]
