"""Tissue masks: thresholding, PNG masks and GeoJSON annotations."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ihcscore.slide import open_slide, write_pyramidal_tiff
from ihcscore.tissue import (
    MaskError,
    mask_from_file,
    read_annotations,
    region_fraction,
    resolve_tissue,
    tissue_mask,
)

REAL = Path(__file__).parent / "data" / "real"


def _glass(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(242, 3, (h, w, 3)), 0, 255).astype(np.uint8)


def _disk_slide(tmp_path, h=1200, w=1600, r=400, centre=(600, 700)):
    rgb = _glass(h, w)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2
    rng = np.random.default_rng(1)
    tissue = np.clip(rng.normal((170, 150, 190), 25, (h, w, 3)), 0, 255).astype(np.uint8)
    rgb[disk] = tissue[disk]
    path = write_pyramidal_tiff(tmp_path / "disk.tif", rgb, 0.5, compression="zlib", min_level_side=256)
    return path, disk


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_blank_glass_gives_empty_mask(tmp_path):
    white = np.full((800, 1000, 3), 255, np.uint8)
    path = write_pyramidal_tiff(tmp_path / "white.tif", white, 0.5, compression="zlib")
    with open_slide(path) as s:
        mask, ds = tissue_mask(s, max_side=500)
    # max_side 500 would allow 1 µm mask pixels; the mask never goes finer than MASK_PIXEL_UM (2 µm).
    assert mask.shape == (200, 250) and ds == pytest.approx(4.0)
    assert not mask.any()
    # noisy glass too
    mask, ds = tissue_mask(_glass(300, 300), mpp=0.5)
    assert ds == 1.0 and not mask.any()


@pytest.mark.parametrize("method", ["glass", "otsu", "saturation"])
def test_tissue_disk_is_found(tmp_path, method):
    path, disk = _disk_slide(tmp_path)
    with open_slide(path) as s:
        mask, ds = tissue_mask(s, max_side=400, method=method)
    assert ds == pytest.approx(4.0)
    truth = disk[2::4, 2::4]
    assert mask.shape == truth.shape
    assert _iou(mask, truth) > 0.9


def test_od_table_equals_the_formula():
    from ihcscore.tissue import _optical_density

    rgb = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, axis=-1)
    expected = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    assert _optical_density(rgb).dtype == np.float32
    assert np.array_equal(_optical_density(rgb), expected)
    assert np.array_equal(_optical_density(rgb.astype(np.float32)), expected)


def test_all_tissue_image_is_not_split():
    rng = np.random.default_rng(2)
    rgb = np.clip(rng.normal((150, 120, 170), 30, (300, 300, 3)), 0, 255).astype(np.uint8)
    rgb[:150] = np.clip(rgb[:150].astype(int) + 60, 0, 255)  # a paler half
    mask, _ = tissue_mask(rgb, mpp=0.5)
    assert mask.mean() > 0.97


def test_png_mask_any_size(tmp_path):
    import imageio.v3 as iio

    path, disk = _disk_slide(tmp_path)
    small = disk[::8, ::8].astype(np.uint8) * 255  # 150 x 200
    iio.imwrite(tmp_path / "m.png", small)
    with open_slide(path) as s:
        mask, ds = mask_from_file(tmp_path / "m.png", s)
        assert mask.shape == (150, 200) and ds == pytest.approx(8.0)
        assert np.array_equal(mask, small > 0)
        iio.imwrite(tmp_path / "bad.png", np.zeros((100, 100), np.uint8))
        with pytest.raises(MaskError, match="bad.png.*aspect"):
            mask_from_file(tmp_path / "bad.png", s)


def _geojson(tmp_path, features, name="a.geojson", collection=True):
    data = {"type": "FeatureCollection", "features": features} if collection else features
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def _feature(geom, name=None, cls=None, object_type="annotation"):
    props = {"objectType": object_type}
    if name:
        props["name"] = name
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geom, "properties": props}


def test_geojson_annotation_rasterises_to_right_area(tmp_path):
    # a 600 x 400 px rectangle with a 100 x 100 hole, and a triangle of area 0.5 * 300 * 300
    rect = {"type": "Polygon", "coordinates": [
        [[100, 200], [700, 200], [700, 600], [100, 600], [100, 200]],
        [[300, 300], [400, 300], [400, 400], [300, 400], [300, 300]]]}
    tri = {"type": "MultiPolygon", "coordinates": [[[[900, 100], [1200, 100], [900, 400], [900, 100]]]]}
    cells = _feature({"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]},
                     object_type="detection")
    point = _feature({"type": "Point", "coordinates": [5, 5]})
    p = _geojson(tmp_path, [_feature(rect, name="Region 1", cls="Tumor"), _feature(tri, cls="Stroma"),
                            cells, point])
    ann = read_annotations(p)
    assert [n for n, _ in ann] == ["Region 1", "Stroma"]
    assert ann[0][1].area == pytest.approx(600 * 400 - 100 * 100)

    path, _ = _disk_slide(tmp_path)
    with open_slide(path) as s:
        mask, ds = mask_from_file(p, s, max_side=800)
        assert ds == pytest.approx(2.0) and mask.shape == (600, 800)
        area_px = mask.sum() * ds**2
        assert area_px == pytest.approx(600 * 400 - 100 * 100 + 0.5 * 300 * 300, rel=0.02)
        assert mask[250 // 2, 400 // 2] and not mask[350 // 2, 350 // 2]  # inside; in the hole
        # a bare list of features works too
        p2 = _geojson(tmp_path, [_feature(rect)], name="list.json", collection=False)
        m2, _ = mask_from_file(p2, s, max_side=800)
        assert m2.sum() * 4 == pytest.approx(600 * 400 - 100 * 100, rel=0.02)
        assert region_fraction(m2, 2.0, 100, 200, 200, 100) == pytest.approx(1.0)
        assert region_fraction(m2, 2.0, 1300, 900, 100, 100) == 0.0
        # resolve_tissue: the CLI's --tissue values
        m_all, _ = resolve_tissue(s, "all", max_side=400)
        assert m_all.all() and m_all.shape == (300, 400)
        assert resolve_tissue(s, str(p2), max_side=800)[0].sum() == m2.sum()


def test_mask_file_errors_name_the_file(tmp_path):
    path, _ = _disk_slide(tmp_path, h=300, w=400, r=100, centre=(150, 200))
    (tmp_path / "broken.geojson").write_text("{not json")
    _geojson(tmp_path, [_feature({"type": "Point", "coordinates": [1, 2]})], name="points.geojson")
    _geojson(tmp_path, [_feature({"type": "Polygon", "coordinates": [
        [[1e6, 1e6], [1e6 + 10, 1e6], [1e6, 1e6 + 10], [1e6, 1e6]]]})], name="far.geojson")
    (tmp_path / "mask.xyz").write_text("?")
    with open_slide(path) as s:
        for name, what in [("missing.geojson", "no such file"), ("broken.geojson", "not valid json"),
                           ("points.geojson", "no polygon"), ("far.geojson", "do not overlap"),
                           ("mask.xyz", "unsupported mask file type")]:
            with pytest.raises(MaskError) as info:
                mask_from_file(tmp_path / name, s)
            msg = str(info.value)
            assert name in msg and "\n" not in msg and what in msg.lower(), msg


def test_real_svs_tissue_mask():
    with open_slide(REAL / "CMU-1-Small-Region.svs") as s:
        mask, ds = tissue_mask(s, max_side=512)
    assert mask.shape == (512, 383) and ds == pytest.approx(2967 / 512)
    assert 0.2 < mask.mean() < 0.7  # a strip of H&E tissue on glass


def test_pale_tissue_with_resolved_nuclei_is_all_tissue():
    """Otsu alone splits pale tissue into nuclei vs the rest; the glass-relative rule keeps it whole."""
    from ihcscore.synthetic import make_synthetic_region

    rgb, truth, labels = make_synthetic_region((768, 768), 0.5, seed=4, tissue_fraction=0.7)
    mask, ds = tissue_mask(rgb, mpp=0.5)
    rows = (truth["y_px"] / ds).astype(int).clip(0, mask.shape[0] - 1)
    cols = (truth["x_px"] / ds).astype(int).clip(0, mask.shape[1] - 1)
    assert mask[rows, cols].mean() > 0.97
    glass = ~labels["tissue"]
    assert mask[glass].mean() < 0.1


def test_annotation_collections_and_the_slides_part_of_a_region(tmp_path):
    """A GeometryCollection's polygons are an annotation (they were refused as 'no Polygon'); a region's
    area is its part on the slide."""
    import shapely

    from ihcscore.regions import region_summaries
    from ihcscore.scoring import ScoringScheme
    from ihcscore.tissue import read_annotations

    p = tmp_path / "gc.geojson"
    square = {"type": "Polygon", "coordinates": [[[-50, -50], [50, -50], [50, 50], [-50, 50], [-50, -50]]]}
    p.write_text(json.dumps({"type": "Feature", "properties": {"name": "corner"}, "geometry": {
        "type": "GeometryCollection", "geometries": [square, {"type": "Point", "coordinates": [5, 5]}]}}))
    ((name, geom),) = read_annotations(p)
    assert name == "corner" and geom.area == 100 * 100
    cells = pd.DataFrame({"x_px": [10.0], "y_px": [10.0], "class": ["tumour"], "Cell: DAB OD mean": [0.5],
                          **{f"{c}: DAB OD mean": [0.5] for c in ("Nucleus", "Cytoplasm", "Membrane")}})
    (region,) = region_summaries(cells, [(name, geom)], ScoringScheme(), mpp=1.0, dimensions=(1000, 1000))
    assert region["area_mm2"] == pytest.approx(50 * 50 / 1e6)
    assert region["n_cells"] == 1
    # overlapping polygons of one collection are one area (their MultiPolygon was invalid: the slide failed)
    other = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
    p.write_text(json.dumps({"type": "Feature", "geometry": {"type": "GeometryCollection",
                                                            "geometries": [square, other]}}))
    ((_, merged),) = read_annotations(p)
    assert merged.is_valid and merged.area == 100 * 100 + 100 * 100 - 50 * 50
    (region,) = region_summaries(cells, [("both", merged)], ScoringScheme(), mpp=1.0, dimensions=(1000, 1000))
    assert region["area_mm2"] == pytest.approx(100 * 100 / 1e6)  # the square on the slide lies inside the other
