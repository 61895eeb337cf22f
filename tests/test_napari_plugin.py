"""napari plugin: reader, dock widget (scores equal the engine's), threshold sliders, annotations, export.

Run headless under a virtual X server: ``xvfb-run -a python -m pytest tests/test_napari_plugin.py``.
"""

import json

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from ihcscore.pipeline import analyze_slide, analyze_slide_region  # noqa: E402
from ihcscore.scoring import assign_bins, score_counts, summarize  # noqa: E402
from ihcscore.slide import SlideError, open_slide, write_pyramidal_tiff  # noqa: E402

pytestmark = pytest.mark.gui

MPP = 0.5
PLUGIN = "ihcscore"  # npe2: the manifest name equals the distribution name


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    from skimage.data import immunohistochemistry

    rgb = immunohistochemistry()  # 512 x 512
    path = tmp_path_factory.mktemp("slides") / "ihc.tif"
    write_pyramidal_tiff(path, rgb, MPP, compression="zlib", min_level_side=128, tile=128)
    return path


def _open(viewer, path):
    layers = viewer.open(str(path), plugin=PLUGIN)
    assert len(layers) == 1
    return layers[0]


def _widget(viewer):
    from napari_ihcscore._widget import IHCScoreWidget

    w = IHCScoreWidget(viewer)
    viewer.window.add_dock_widget(w, name="IHC score", area="right")
    w.preset_combo.setCurrentText("cxcr4")
    return w


def _rectangle(viewer, x0, y0, x1, y1, mpp=MPP, name="annotations"):
    """A Shapes rectangle (µm) whose corners sit on the centres of level-0 pixels x0..x1, y0..y1."""
    r = np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], float) * mpp
    return viewer.add_shapes([r], shape_type="rectangle", name=name)


def test_reader_opens_lazy_multiscale_in_um(make_napari_viewer, slide_path):
    from napari_ihcscore._reader import napari_get_reader

    assert napari_get_reader(str(slide_path)) is not None
    assert napari_get_reader("notes.txt") is None
    viewer = make_napari_viewer()
    layer = _open(viewer, slide_path)
    assert layer.rgb and layer.multiscale
    assert tuple(layer.scale) == pytest.approx((MPP, MPP))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]  # the scale bar reads µm
    assert layer.metadata["mpp"] == pytest.approx(MPP)
    assert layer.metadata["ihcscore_path"] == str(slide_path)
    import dask.array as da

    assert all(isinstance(level, da.Array) for level in layer.data)  # tiles read on demand
    with open_slide(slide_path) as s:
        assert len(layer.data) == s.level_count
        want = s.read_region((128, 64), 0, (40, 30))
    np.testing.assert_array_equal(np.asarray(layer.data[0][64:94, 128:168]), want)


def test_widget_uses_the_file_mpp_when_another_reader_opened_it(make_napari_viewer, slide_path):
    """napari's built-in reader may win for .tif: pixels in scale 1, no mpp; the widget asks the engine."""
    from napari_ihcscore._slides import layer_slide

    viewer = make_napari_viewer()
    layer = viewer.open(str(slide_path), plugin="napari")[0]
    assert tuple(layer.scale) == (1.0, 1.0)
    assert layer_slide(layer).mpp == pytest.approx(MPP)
    w = _widget(viewer)
    _rectangle(viewer, 40, 30, 339, 259, mpp=1.0)
    viewer.layers.selection.active = viewer.layers["annotations"]
    res = w.run(sync=True)
    assert w.last_error is None, w.last_error
    with open_slide(slide_path) as s:
        eng = analyze_slide_region(s, (40, 30, 300, 230), w.current_preset(), polygon=w.last_regions[0].polygon)
    assert len(res.cells) == len(eng.cells)
    # the engine's level-0 pixel k spans [k, k + 1) (QuPath's convention); napari centres it on k
    np.testing.assert_allclose(viewer.layers["cell centroids"].data, eng.cells[["y_px", "x_px"]].to_numpy() - 0.5)


def test_reader_error_names_the_file(make_napari_viewer, tmp_path):
    from napari_ihcscore._reader import napari_get_reader

    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"this is not a slide" * 10)
    reader = napari_get_reader(str(bad))
    with pytest.raises(SlideError, match="broken.svs"):
        reader(str(bad))
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match="broken.svs"):
        viewer.open(str(bad), plugin=PLUGIN)
    assert len(viewer.layers) == 0


def test_widget_scores_rectangle_like_the_engine(make_napari_viewer, qtbot, slide_path, tmp_path):
    from napari.layers import Labels, Points

    from napari_ihcscore._core import bin_rgba

    viewer = make_napari_viewer()
    image = _open(viewer, slide_path)
    w = _widget(viewer)
    _rectangle(viewer, 40, 30, 339, 259)
    viewer.layers.selection.active = viewer.layers["annotations"]

    # background run (thread_worker), GUI stays responsive; wait for it
    worker = w.run()
    assert worker is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    assert w.last_error is None, w.last_error
    (region,) = w.last_regions
    assert (region.x, region.y, region.w, region.h) == (40, 30, 300, 230)

    # the engine on the same part of the slide with the same preset
    preset = w.current_preset()
    with open_slide(slide_path) as s:
        eng = analyze_slide_region(s, (40, 30, 300, 230), preset, polygon=region.polygon)
    cells = w.result.cells
    assert len(cells) == len(eng.cells) > 20
    np.testing.assert_array_equal(cells["bin"].to_numpy(), eng.cells["bin"].to_numpy())
    np.testing.assert_allclose(cells["x_um"].to_numpy(), eng.cells["x_um"].to_numpy())
    comp = preset.scoring.compartment
    for group in ("tumour", "all"):
        for key in ("n", "n_0", "n_1", "n_2", "n_3", "h_score", "percent_positive", "allred", "irs"):
            assert w.table_value("all regions", group, comp, key) == eng.summary[group][key], (group, key)
        for c in ("nucleus", "cytoplasm", "membrane", "cell"):
            assert w.table_value("all regions", group, c, "h_score") == eng.summary[group]["by_compartment"][c]["h_score"]

    # layers: labels placed in µm over the slide, points at the centroids with the table as features
    labels = viewer.layers["cells"]
    points = viewer.layers["cell centroids"]
    assert isinstance(labels, Labels) and isinstance(points, Points)
    ds = eng.downsample
    assert tuple(labels.scale) == pytest.approx((ds * MPP, ds * MPP))
    ox, oy = eng.origin_px  # the label image covers the rectangle and the context it was segmented with
    assert ox < 40 and oy < 30
    assert tuple(labels.translate) == pytest.approx(((oy + 0.5 * ds - 0.5) * MPP, (ox + 0.5 * ds - 0.5) * MPP))
    np.testing.assert_array_equal(labels.data, eng.segmentation.cells)
    np.testing.assert_allclose(points.data, eng.cells[["y_um", "x_um"]].to_numpy() - 0.5 * MPP)  # napari: centred
    assert list(points.features["bin"]) == list(eng.cells["bin"])
    # a labelled pixel's world position is inside its cell: nucleus centroid maps back to its label
    row = eng.cells.iloc[len(eng.cells) // 2]
    data_yx = np.round(labels.world_to_data((row["y_um"], row["x_um"]))).astype(int)
    assert eng.segmentation.nuclei[tuple(data_yx)] == row["label"]
    np.testing.assert_allclose(points.face_color, bin_rgba(eng.cells["bin"].to_numpy()))
    lab = int(row["label"])
    np.testing.assert_allclose(labels.colormap.color_dict[lab], bin_rgba([row["bin"]])[0])

    # move a threshold slider: bins and scores follow assign_bins/summarize on the same table, no re-detection
    before = w.table_value("all regions", "tumour", comp, "h_score")
    # 0.01 OD: (nearly) every negative tumour cell becomes 1+, so the H-score must move
    assert eng.summary["tumour"]["n_0"] > 0
    w.sliders[0].setValue(0.01)
    qtbot.waitUntil(lambda: w.table_value("all regions", "tumour", comp, "h_score") != before, timeout=5000)
    t = w.thresholds()
    assert t == pytest.approx((0.01, 0.4, 0.6))
    want_bins = assign_bins(eng.cells[preset.scoring.measurement].to_numpy(), t)
    np.testing.assert_array_equal(w.result.cells["bin"].to_numpy(), want_bins)
    tum = eng.cells["class"].to_numpy() == "tumour"
    assert w.table_value("all regions", "tumour", comp, "h_score") == score_counts(want_bins[tum])["h_score"]
    assert w.table_value("all regions", "all", comp, "n") == len(eng.cells)
    np.testing.assert_allclose(points.face_color, bin_rgba(want_bins))
    np.testing.assert_allclose(labels.colormap.color_dict[lab], bin_rgba([want_bins[row.name]])[0])

    # a slider pushed past its neighbour keeps the thresholds increasing
    w.sliders[2].setValue(0.3)
    w.rescore()
    t2, t3 = w.thresholds()[1:]
    assert t2 < t3 == pytest.approx(0.3)

    # exports through ihcscore.export
    w.set_thresholds((0.2, 0.4, 0.6))
    csv = w.export("csv", tmp_path / "cells.csv")
    js = json.loads(w.export("json", tmp_path / "summary.json").read_text())
    gj = json.loads(w.export("geojson", tmp_path / "cells.geojson").read_text())
    import pandas as pd

    assert len(pd.read_csv(csv)) == len(eng.cells)
    assert js["tumour"]["h_score"] == eng.summary["tumour"]["h_score"]
    assert len(gj["features"]) == len(eng.cells)
    assert gj["features"][0]["geometry"]["type"] == "Polygon"
    # npe2 writers: the Points layer's features as a cell table, the Labels layer as a TIFF
    saved = points.save(str(tmp_path / "points.csv"), plugin=PLUGIN)
    assert len(pd.read_csv(saved[0])) == len(eng.cells)
    import tifffile

    saved = labels.save(str(tmp_path / "cells.tif"), plugin=PLUGIN)
    # the region's cells only: the context's cells around it are segmented, not scored
    kept = np.where(np.isin(eng.segmentation.cells, eng.cells["label"]), eng.segmentation.cells, 0)
    assert 0 < (kept > 0).sum() < (eng.segmentation.cells > 0).sum()
    np.testing.assert_array_equal(tifffile.imread(saved[0]), kept)
    assert image in viewer.layers


def test_classes_and_exclusion_rescore(make_napari_viewer, slide_path, tmp_path):
    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    w.region_mode.setCurrentText("Visible field")
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    cells = w.result.cells.copy()
    n = len(cells)
    assert n > 50
    w.add_annotation_layers()
    # click one "other" cell into tumour and one tumour cell into non-tumour
    other = cells.index[cells["class"] == "other"][0] if (cells["class"] == "other").any() else None
    tumour = cells.index[cells["class"] == "tumour"][0]
    if other is not None:
        viewer.layers["tumour"].add(cells.loc[other, ["y_um", "x_um"]].to_numpy(float))
    viewer.layers["non-tumour"].add(cells.loc[tumour, ["y_um", "x_um"]].to_numpy(float))
    # exclude the left third of the field
    W = cells["x_um"].max()
    viewer.layers["exclude"].add_polygons([np.array([[-10, -10], [-10, W / 3], [1e4, W / 3], [1e4, -10]])])
    info = w.apply_annotations()
    got = w.result.cells
    assert got.loc[tumour, "class"] == "other"
    if other is not None and info["method"] == "override":
        assert got.loc[other, "class"] == "tumour"
    excluded = cells["x_um"].to_numpy() < W / 3
    np.testing.assert_array_equal(w.result.excluded, excluded)
    want = summarize(got[~excluded], w.scheme())
    comp = w.scheme().compartment
    assert w.table_value("all regions", "all", comp, "n") == want["all"]["n"] == int((~excluded).sum())
    assert w.table_value("all regions", "tumour", comp, "h_score") == want["tumour"]["h_score"]
    assert not viewer.layers["cell centroids"].shown[excluded].any()
    # File > Save of the points layer writes the cells that count, as the widget's export does
    import pandas as pd

    saved = viewer.layers["cell centroids"].save(str(tmp_path / "points.csv"), plugin=PLUGIN)
    assert len(pd.read_csv(saved[0])) == int((~excluded).sum())
    w.reset_classes()
    assert w.table_value("all regions", "all", comp, "n") == n


def test_whole_slide_run_and_sample(make_napari_viewer, slide_path, qtbot, tmp_path):
    from napari_ihcscore._sample_data import sample_skimage_ihc

    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    w.region_mode.setCurrentText("Whole slide")
    res = w.run(sync=True)
    assert w.last_error is None, w.last_error
    assert res.kind == "slide" and len(res.cells) > 50
    head = res.slide_summary
    comp = w.scheme().compartment
    assert w.table_value("all regions", "tumour", comp, "h_score") == head["tumour"]["h_score"]
    assert "cells" not in viewer.layers  # analyze_slide returns no label images
    assert len(viewer.layers["cell centroids"].data) == len(res.cells)
    # the GeoJSON export holds the cells' outlines (it held 17-vertex circles)
    gj = json.loads(w.export("geojson", tmp_path / "slide.geojson").read_text())
    assert len(gj["features"]) == len(res.cells)
    ring = np.asarray(gj["features"][0]["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring, np.asarray(res.cells["cell_polygon"].iloc[0]), atol=1e-3)

    # stain estimation from a rectangle and the H / DAB OD preview of the field on screen (engine calls)
    _rectangle(viewer, 0, 0, 511, 511, name="stain box")
    viewer.layers.selection.active = viewer.layers["stain box"]
    sv = w.estimate_stains()
    assert w.stains() == sv and w.current_preset().stains.dab == pytest.approx(sv.dab)
    h_layer, dab_layer = w.preview()
    assert h_layer.name == "Hematoxylin OD" and dab_layer.name == "DAB OD"
    assert dab_layer.data.max() > 0.3 and h_layer.data.min() >= 0
    w.set_stains(None)
    viewer.layers.remove("stain box")

    # sample data opens as an RGB layer in µm, and the widget scores an in-memory layer too
    (data, kwargs, kind) = sample_skimage_ihc()[0]
    assert kind == "image" and kwargs["rgb"]
    layer = viewer.add_image(data, **kwargs)
    w.image_combo.setCurrentText(layer.name)
    w.region_mode.setCurrentText("Selected annotations")
    _rectangle(viewer, 0, 0, 199, 199, mpp=layer.scale[-1], name="box")
    viewer.layers.selection.active = viewer.layers["box"]
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    assert len(w.result.cells) > 5

    img = viewer.screenshot(canvas_only=False, flash=False)
    assert img.ndim == 3 and img.shape[0] > 100 and img[..., :3].std() > 5


def test_presets_are_used_as_written_and_a_new_preset_clears_the_cells(make_napari_viewer, slide_path):
    from ihcscore.preset import load_preset

    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    # values finer than the controls' default decimals, a threshold beyond the slider's default range
    custom = load_preset("cxcr4").replace(name="mylab", sigma_um=1.125, min_area_um2=12.25,
                                          thresholds=(0.2, 0.4, 2.8))
    w.set_preset(custom)
    used = w.current_preset()
    assert used.detection.sigma_um == 1.125 and used.detection.min_area_um2 == 12.25
    assert used.scoring.thresholds == (0.2, 0.4, 2.8)
    assert used.detection == custom.detection

    _rectangle(viewer, 40, 30, 339, 259)
    viewer.layers.selection.active = viewer.layers["annotations"]
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    assert "cell centroids" in viewer.layers and not w._stale
    # a detection setting changed after the run: said once, the cells stay (scores still re-bin)
    w.det_spins["sigma_um"].setValue(2.0)
    assert w._stale and "press Run" in w.status.text()
    # another marker: the cells of this one are cleared, not re-binned with the other's thresholds
    w.preset_combo.setCurrentText("ki67")
    assert w.result is None and "cell centroids" not in viewer.layers and "cells" not in viewer.layers
    assert w.table.rowCount() == 0 and "press Run" in w.status.text()
    w.run(sync=True)
    assert w.last_error is None and w.result.preset.name == "ki67"


def test_in_memory_layers_of_other_pixel_types_score_as_uint8(make_napari_viewer):
    from skimage.data import immunohistochemistry

    rgb = immunohistochemistry()[:300, :300]
    viewer = make_napari_viewer()
    w = _widget(viewer)
    results = []
    for data in (rgb, rgb.astype(np.float32) / 255, rgb.astype(np.uint16) * 257):
        layer = viewer.add_image(data, rgb=True, scale=(MPP, MPP), name=f"ihc {data.dtype}",
                                 metadata={"mpp": MPP})
        w.image_combo.setCurrentText(layer.name)
        w.region_mode.setCurrentText("Whole slide")  # an in-memory layer: read at once
        w.run(sync=True)
        assert w.last_error is None, w.last_error
        results.append(w.result.cells)
    assert len(results[0]) > 20
    for other in results[1:]:
        np.testing.assert_array_equal(other["bin"].to_numpy(), results[0]["bin"].to_numpy())
        np.testing.assert_allclose(other["x_px"].to_numpy(), results[0]["x_px"].to_numpy())


def test_region_of_an_he_slide_is_flagged(make_napari_viewer):
    """A region of the H&E CMU-1 slide: the engine's "not H-DAB" warning reaches the pathologist."""
    from pathlib import Path

    svs = Path(__file__).parent / "data" / "real" / "CMU-1-Small-Region.svs"
    viewer = make_napari_viewer()
    image = _open(viewer, svs)
    w = _widget(viewer)
    mpp = image.scale[-1]
    _rectangle(viewer, 600, 600, 1199, 1199, mpp=mpp)
    viewer.layers.selection.active = viewer.layers["annotations"]
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    assert any("H&E" in m for m in w.result.warnings)
    assert "Warning:" in w.status.text() and "H&E" in w.status.text()
    assert any("H&E" in m for m in w.summary_document()["warnings"])  # and in the exported summary


def test_a_region_drawn_twice_counts_each_cell_once_in_classes_and_exclusions(make_napari_viewer, slide_path,
                                                                               tmp_path):
    """The same rectangle twice: clicks, the trained classifier, exclusions and the summary treat each cell
    once, and every copy of a cell gets the same class (a click used to land on a hidden copy)."""
    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)

    def run_with(n_copies):
        for name in ("annotations", "tumour", "non-tumour", "exclude"):
            if name in viewer.layers:
                viewer.layers.remove(name)
        shapes = _rectangle(viewer, 40, 30, 339, 259)
        for _ in range(n_copies - 1):
            shapes.add_rectangles([np.array([[30, 40], [259, 339]], float) * MPP])
        shapes.selected_data = set()
        viewer.layers.selection.active = shapes
        w.run(sync=True)
        assert w.last_error is None, w.last_error
        cells = w.result.cells
        w.add_annotation_layers()
        tum = cells.index[cells["class"] == "tumour"][:4]
        oth = cells.index[cells["class"] == "other"][:4]
        for i in tum:  # tumour cells clicked as non-tumour and the reverse: trains a classifier
            viewer.layers["non-tumour"].add(cells.loc[i, ["y_um", "x_um"]].to_numpy(float))
        for i in oth:
            viewer.layers["tumour"].add(cells.loc[i, ["y_um", "x_um"]].to_numpy(float))
        viewer.layers["exclude"].add_polygons([np.array([[0, 0], [0, 60], [200, 60], [200, 0]], float)])
        info = w.apply_annotations()
        return info, w.result, w.summary_document()

    info1, one, doc1 = run_with(1)
    info2, two, doc2 = run_with(2)
    assert two.duplicate.sum() == len(one.cells) and info2["method"] == info1["method"] == "classifier"
    first = two.cells.iloc[two.first]
    assert (two.cells["class"].to_numpy() == first["class"].to_numpy()).all()  # every copy as its first
    np.testing.assert_array_equal(two.cells.iloc[two.unique_rows]["class"].to_numpy(), one.cells["class"].to_numpy())
    assert info2["n_excluded"] == info1["n_excluded"] == doc2["n_excluded"] > 0
    assert doc2["n_class_overrides"] == doc1["n_class_overrides"]
    for key in ("n_cells", "tumour", "all"):
        assert doc2[key] == doc1[key], key


def test_estimating_preset_deconvolves_every_region_with_the_slides_vectors(make_napari_viewer, slide_path, tmp_path):
    from ihcscore.pipeline import slide_stains
    from ihcscore.preset import load_preset

    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    w.set_preset(load_preset("cxcr4").replace(name="estimating", estimate_stains=True))
    shapes = _rectangle(viewer, 10, 10, 200, 200)
    shapes.add_rectangles([np.array([[300, 300], [500, 500]], float) * MPP])
    shapes.selected_data = set()
    viewer.layers.selection.active = shapes
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    import shapely

    gj = tmp_path / "shapes.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.Polygon(r.polygon))}
        for r in w.last_regions]}))
    with open_slide(slide_path) as s:
        cli = analyze_slide(s, w.current_preset(), tissue=str(gj))
        assert slide_stains(s, w.current_preset(), tissue=str(gj))[0] == cli.stains
    # once for the slide, from the windows the shapes meet, as `ihcscore score --tissue SHAPES.geojson` does
    assert w.result.stains == cli.stains
    assert w.summary_document()["stain_vectors"] == cli.stains.to_dict()


def test_cells_follow_a_moved_or_rotated_slide(make_napari_viewer, slide_path, tmp_path):
    viewer = make_napari_viewer()
    image = _open(viewer, slide_path)
    image.affine = np.array([[1, 0, 40.0], [0, 1, 60.0], [0, 0, 1]])
    image.rotate = 30
    w = _widget(viewer)
    w.region_mode.setCurrentText("Whole slide")
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    cells = w.result.cells
    points = viewer.layers["cell centroids"].data
    want = np.array([image.data_to_world(p) for p in cells[["y_px", "x_px"]].to_numpy()[:20] - 0.5])
    np.testing.assert_allclose(points[:20], want, atol=1e-6)
    # region mode: the label image lies under its cells
    w.region_mode.setCurrentText("Selected annotations")
    shapes = viewer.add_shapes([np.array([image.data_to_world(p) for p in
                                          ([30, 40], [30, 339], [259, 339], [259, 40])])], name="roi")
    viewer.layers.selection.active = shapes
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    labels = viewer.layers["cells"]
    for _, row in w.result.cells.iloc[::10].iterrows():
        world = image.data_to_world((row["y_px"] - 0.5, row["x_px"] - 0.5))
        yx = np.round(labels.world_to_data(world)).astype(int)
        assert labels.data[tuple(yx)] == row["label"]
    # saved and opened again, the labels lie where they were
    saved = labels.save(str(tmp_path / "cells.tif"), plugin=PLUGIN)
    (reopened,) = viewer.open(saved[0], plugin=PLUGIN)
    row = w.result.cells.iloc[len(w.result.cells) // 2]
    world = image.data_to_world((row["y_px"] - 0.5, row["x_px"] - 0.5))
    assert reopened.data[tuple(np.round(reopened.world_to_data(world)).astype(int))] == row["label"]
    # the preview placed over a rotated slide, then over the same slide unrotated: no stale part remains
    w.preview()
    image.rotate, image.affine = 0, np.eye(3)
    (h_layer, _) = w.preview()
    np.testing.assert_allclose(h_layer.affine.affine_matrix, np.eye(3))


def test_preset_box_names_the_preset_in_use(make_napari_viewer, tmp_path):
    from ihcscore.preset import load_preset

    viewer = make_napari_viewer()
    w = _widget(viewer)
    toml = tmp_path / "my.toml"
    toml.write_text(load_preset("ki67").replace(name="my-ki67", sigma_um=1.25).to_toml(), encoding="utf-8")
    w._load_preset(str(toml))
    assert w.preset_combo.currentText() == "my-ki67 (my.toml)"
    w.preset_combo.setCurrentText("cxcr4")
    assert w.current_preset().name == "cxcr4"
    w.preset_combo.setCurrentText("my-ki67 (my.toml)")  # chosen again: the file's preset, not an error
    assert w.last_error is None and w.current_preset().detection.sigma_um == 1.25
    # a file named like a packaged preset, with other values, is told apart from it
    other = tmp_path / "ki67.toml"
    other.write_text(load_preset("ki67").replace(thresholds=(0.15, 0.35, 0.55)).to_toml(), encoding="utf-8")
    w._load_preset(str(other))
    assert w.preset_combo.currentText() == "ki67 (ki67.toml)" and w.thresholds() == (0.15, 0.35, 0.55)


def test_a_shape_smaller_than_a_pixel_is_scored_not_called_outside(make_napari_viewer, slide_path):
    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    _rectangle(viewer, 250.1, 250.1, 250.4, 250.4)  # no pixel centre inside
    viewer.layers.selection.active = viewer.layers["annotations"]
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    (region,) = w.last_regions
    assert (region.x, region.y, region.w, region.h) == (250, 250, 1, 1)
    # thinner than a pixel one way, long the other: only the thin axis collapses
    viewer.layers.remove("annotations")
    _rectangle(viewer, 250.1, 100, 250.4, 400)
    viewer.layers.selection.active = viewer.layers["annotations"]
    w.run(sync=True)
    (region,) = w.last_regions
    assert (region.x, region.y, region.w, region.h) == (250, 100, 1, 301)


def test_widget_state_stays_consistent_across_runs_edits_and_interruptions(make_napari_viewer, slide_path, qtbot,
                                                                           tmp_path, monkeypatch):
    from skimage.data import immunohistochemistry

    from ihcscore.preset import load_preset
    from napari_ihcscore import _widget as widget_mod
    from napari_ihcscore._core import ellipse_polygon, points_in_polygons

    viewer = make_napari_viewer()
    image = _open(viewer, slide_path)
    w = _widget(viewer)
    w.region_mode.setCurrentText("Whole slide")
    w.run(sync=True)
    first = w.result
    assert w.last_error is None and len(first.cells) > 50

    # exclusions drawn (an ellipse: its inside, not its box) survive a re-run
    w.add_annotation_layers()
    assert [str(u) for u in viewer.layers[widget_mod.EXCLUDE_LAYER].units] == ["micrometer", "micrometer"]
    box = np.array([[50, 50], [50, 150], [150, 150], [150, 50]], float)  # (y, x) µm
    viewer.layers[widget_mod.EXCLUDE_LAYER].add_ellipses([box])
    info = w.apply_annotations()
    ring = ellipse_polygon(box[:, ::-1])
    want = points_in_polygons(first.cells["x_um"], first.cells["y_um"], [ring])
    assert info["n_excluded"] == int(want.sum()) > 0
    w.run(sync=True)
    assert int(w.result.excluded.sum()) == int(want.sum())

    # points deleted by hand: re-binning puts the cells back instead of failing
    pts = viewer.layers["cell centroids"]
    pts.selected_data = {0, 1, 2}
    pts.remove_selected()
    w.set_thresholds((0.1, 0.3, 0.5))
    assert len(viewer.layers["cell centroids"].data) == len(w.result.cells)

    # a slider pushed to the top keeps the thresholds increasing
    w.sliders[1].setValue(w.sliders[1].maximum())
    t1, t2, t3 = w.thresholds()
    assert t1 < t2 < t3 and w.rescore() is not None

    # another slide chosen, its run cancelled: the result stays the first slide's
    other = viewer.add_image(immunohistochemistry(), rgb=True, scale=(MPP, MPP), name="other",
                             metadata={"mpp": MPP})
    w.image_combo.setCurrentText(other.name)
    w.run()
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    assert w._image is image and w.summary_document()["slide"] == image.name

    # a preset chosen during a run cancels it: no cells of one marker shown with another's thresholds
    w.image_combo.setCurrentText(image.name)
    w.run()
    w.preset_combo.setCurrentText("ki67")
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    assert w.result is None and w.last_error == "cancelled"

    # an estimating preset: Save JSON writes the vectors the run used
    w.set_preset(load_preset("cxcr4").replace(name="est", estimate_stains=True))
    w.run(sync=True)
    target = tmp_path / "used.json"
    monkeypatch.setattr(widget_mod.QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    w._save_stains()
    assert json.loads(target.read_text())["dab"] == pytest.approx(list(w.result.stains.dab))

    # a preset value with more than 6 decimals is kept
    w.set_preset(load_preset("cxcr4").replace(name="fine", pixel_size_um=0.2270972430394695))
    assert w.current_preset().detection.pixel_size_um == 0.2270972430394695


def test_saving_stains_to_a_missing_folder_is_one_line(make_napari_viewer, tmp_path, monkeypatch):
    from napari_ihcscore import _widget as widget_mod

    viewer = make_napari_viewer()
    w = _widget(viewer)
    target = tmp_path / "no such folder" / "stains.json"
    monkeypatch.setattr(widget_mod.QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    w._save_stains()
    assert w.last_error.startswith(str(target)) and "\n" not in w.last_error
    assert not target.parent.exists()


def test_several_annotations_score_as_the_cli_and_cancel(make_napari_viewer, qtbot, slide_path, tmp_path):
    """Rectangle, triangle and an ellipse overlapping the rectangle: each region's cells, and the union's
    (a shared cell counted once), are those `ihcscore score --tissue ANNOTATIONS.geojson` finds."""
    import pandas as pd
    import shapely

    viewer = make_napari_viewer()
    _open(viewer, slide_path)
    w = _widget(viewer)
    shapes = _rectangle(viewer, 0, 0, 199, 149)
    tri = np.array([[300, 250], [500, 250], [500, 480]], float)  # (y, x) level-0 px
    shapes.add_polygons([tri * MPP])
    shapes.add_ellipses([np.array([[80, 150], [80, 350], [220, 350], [220, 150]], float) * MPP])
    shapes.add_lines([np.array([[400, 20], [480, 120]], float) * MPP])  # no area: left out
    shapes.selected_data = set()  # none selected: every shape of the active layer
    viewer.layers.selection.active = shapes
    w.run(sync=True)
    assert w.last_error is None, w.last_error
    regions = w.last_regions
    assert [r.name for r in regions] == ["annotations #1", "annotations #2", "annotations #3"]
    ellipse = shapely.Polygon(regions[2].polygon)
    assert ellipse.area == pytest.approx(np.pi * 100 * 70, rel=0.01)  # not its bounding box (4 * 100 * 70)

    gj = tmp_path / "annotations.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": shapely.geometry.mapping(shapely.Polygon(r.polygon)),
         "properties": {"name": r.name}} for r in regions]}))
    with open_slide(slide_path) as s:
        cli = analyze_slide(s, w.current_preset(), tissue=str(gj))
    comp = w.scheme().compartment
    for r, want in zip(regions, cli.summary["regions"]):
        assert w.table_value(r.name, "all", comp, "n") == want["n_cells"] > 5
        assert w.table_value(r.name, "tumour", comp, "h_score") == want["tumour"]["h_score"]
    n_per_region = sum(want["n_cells"] for want in cli.summary["regions"])
    assert w.result.duplicate.sum() == n_per_region - len(cli.cells) > 0  # the rectangle and ellipse share cells
    assert w.table_value("all regions", "all", comp, "n") == len(cli.cells)
    assert w.table_value("all regions", "tumour", comp, "h_score") == cli.summary["tumour"]["h_score"]
    # every export and the npe2 writer hold each cell once
    exported = pd.read_csv(w.export("csv", tmp_path / "cells.csv"))
    saved = pd.read_csv(viewer.layers["cell centroids"].save(str(tmp_path / "points.csv"), plugin=PLUGIN)[0])
    for table in (exported, saved):
        assert len(table) == len(cli.cells)
        np.testing.assert_allclose(np.sort(table["x_px"].to_numpy()), np.sort(cli.cells["x_px"].to_numpy()))

    # a line alone is not an area: one line of error, nothing run
    lines = viewer.add_shapes([np.array([[10, 10], [100, 100]], float) * MPP], shape_type="line", name="a line")
    viewer.layers.selection.active = lines
    before = w.result
    w.run(sync=True)
    assert "a line has no area to score" in w.last_error and w.result is before
    viewer.layers.remove(lines)
    viewer.layers.selection.active = shapes

    # Cancel stops a background run at the next region; the previous result stays
    before = w.result
    shapes.add_rectangles([np.array([[0, 300], [200, 500]], float) * MPP])
    # Cancel as soon as the run starts: waiting for a progress signal races a fast engine.
    w.run()
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    assert w.last_error == "cancelled"
    assert w.result is before
    assert w.run_btn.isEnabled() and not w.cancel_btn.isEnabled()


@pytest.mark.parametrize("max_side", [70, 141, 110])  # downsamples 4.03, 2 and 2.56 over a 211 x 282 px field
def test_preview_at_a_downsample_lies_on_the_pixels_it_was_read_from(make_napari_viewer, tmp_path, max_side):
    """Each preview pixel is drawn over the slide pixels it was read from (it was up to 2 px off: the read's
    origin snapped to a pyramid level, and its spacing taken from the field's width)."""
    from napari_ihcscore._core import Region
    from napari_ihcscore._widget import _image_matrix

    rgb = np.full((512, 512, 3), 250, np.uint8)
    dots = [(x, y) for x in range(185, 380, 23) for y in range(101, 365, 29)]  # (x, y), level-0 px
    for x, y in dots:
        rgb[y, x] = (40, 40, 120)  # one dark pixel
    path = tmp_path / "dots.tif"
    write_pyramidal_tiff(path, rgb, MPP, compression="zlib", min_level_side=128, tile=128)
    viewer = make_napari_viewer()
    image = _open(viewer, path)
    w = _widget(viewer)
    w.visible_region = lambda layer: Region("visible field", 177, 90, 211, 282)
    h_layer, _ = w.preview(max_side=max_side)
    to_layer = np.linalg.inv(_image_matrix(h_layer)) @ _image_matrix(image)
    ds = 282 / max_side
    off = []
    for x, y in dots:
        p = (to_layer @ [y, x, 1.0])[:2]  # where the dot is drawn in the preview's pixels (napari: centred on k)
        r0, c0 = np.round(p).astype(int) - 2
        win = np.clip(h_layer.data[r0:r0 + 5, c0:c0 + 5] - np.median(h_layer.data), 0, None)  # the dot alone
        rr, cc = np.mgrid[0:5, 0:5]
        seen = np.array([(rr * win).sum(), (cc * win).sum()]) / win.sum() + (r0, c0)  # where its OD is
        off.append((seen - p) * ds)  # level-0 px
    off = np.array(off)
    print("preview offset (level-0 px): mean", off.mean(axis=0), "max", np.abs(off).max(axis=0))
    # no bias (it was 0.5-4 px); one dot is a sixteenth of a preview pixel at ds 4: seen within half a pixel
    assert np.abs(off.mean(axis=0)).max() < 0.25 and np.abs(off).max() <= ds / 2, off


def test_shapes_drawn_on_pixel_edges_stay_on_them(make_napari_viewer, tmp_path):
    """napari keeps vertices in float32: at 0.504 µm/px a corner on the edge x = 510 came back at 509.99998886,
    and a centroid lying on that edge counted in the widget but not with the same GeoJSON in the CLI."""
    from skimage.data import immunohistochemistry

    path = tmp_path / "ihc504.tif"
    write_pyramidal_tiff(path, immunohistochemistry(), 0.504, compression="zlib", min_level_side=128, tile=128)
    viewer = make_napari_viewer()
    image = _open(viewer, path)
    w = _widget(viewer)
    # napari data coordinates centre pixel k on k: the engine's edges 510 and 512 are at 509.5 and 511.5
    layer = _rectangle(viewer, 509.5, 130.5, 511.5, 211.5, mpp=0.504)
    xy = w._shape_level0(layer, image, 0)
    assert sorted(map(tuple, xy.tolist())) == [(510.0, 131.0), (510.0, 212.0), (512.0, 131.0), (512.0, 212.0)]
    # far out on a whole slide a float32 step is ~0.004 µm: still put back on the edge
    far = _rectangle(viewer, 89999.5, 130.5, 90001.5, 211.5, mpp=0.504, name="far")
    xy = w._shape_level0(far, image, 0)
    assert sorted(set(xy[:, 0].tolist())) == [90000.0, 90002.0]


def test_a_shape_off_the_pixel_grid_counts_the_cells_the_cli_counts(make_napari_viewer, slide_path, tmp_path):
    """The region read for a shape covered only the pixels whose centres lay within its extent: a cell inside the
    polygon, in the last part-covered pixel column, was dropped (the CLI counted it)."""
    import shapely

    from ihcscore.preset import load_preset

    with open_slide(slide_path) as s:
        cells = analyze_slide(s, load_preset("cxcr4")).cells
    inner = cells[(cells["x_px"] > 150) & (cells["x_px"] < 350) & (cells["y_px"] > 150) & (cells["y_px"] < 350)]
    frac = inner["x_px"] - np.floor(inner["x_px"])
    viewer = make_napari_viewer()
    image = _open(viewer, slide_path)
    w = _widget(viewer)
    for k, (_, c) in enumerate(inner[frac < 0.4].head(3).iterrows()):
        x0, x1 = c["x_px"] - 30.0, np.floor(c["x_px"]) + 0.45  # the right edge past the centroid, mid-pixel
        poly = np.array([[x0, c["y_px"] - 30], [x1, c["y_px"] - 30], [x1, c["y_px"] + 30], [x0, c["y_px"] + 30]])
        gj = tmp_path / f"roi{k}.geojson"
        gj.write_text(json.dumps({"type": "Feature", "geometry": shapely.geometry.mapping(shapely.Polygon(poly))}))
        with open_slide(slide_path) as s:
            want = analyze_slide(s, load_preset("cxcr4"), tissue=str(gj)).cells
        assert np.isclose(want["x_px"], c["x_px"]).any()
        for name in [l.name for l in viewer.layers if l.name == "annotations"]:
            viewer.layers.remove(name)
        viewer.add_shapes([(poly[:, ::-1] - 0.5) * MPP], shape_type="polygon", name="annotations")  # napari: centred
        viewer.layers.selection.active = viewer.layers["annotations"]
        w.run(sync=True)
        assert w.last_error is None, w.last_error
        got = w.result.cells
        assert len(got) == len(want) and np.isclose(got["x_px"], c["x_px"]).any()
