"""Slide reading and writing: synthetic round trips and real vendor files."""

from pathlib import Path

import numpy as np
import pytest

from ihcscore.slide import write_pyramidal_tiff


def _gradient(h=1100, w=900):
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], -1).astype(np.uint8)
    rgb[100:220, 150:400] = (120, 80, 40)
    return rgb


@pytest.mark.parametrize("compression,aperio", [("zlib", True), ("jpeg", False), ("jpeg", True)])
def test_write_pyramidal_tiff_opens_in_openslide(tmp_path, compression, aperio):
    openslide = pytest.importorskip("openslide")
    rgb = _gradient()
    path = write_pyramidal_tiff(tmp_path / "a.tif", rgb, 0.25, compression=compression,
                                aperio=aperio, min_level_side=256)
    assert not [p for p in tmp_path.iterdir() if p.name != "a.tif"]  # no temp file left
    with openslide.OpenSlide(str(path)) as o:
        assert o.properties["openslide.vendor"] == ("aperio" if aperio else "generic-tiff")
        assert o.level_dimensions == ((900, 1100), (450, 550), (225, 275))
        assert float(o.properties["openslide.mpp-x"]) == pytest.approx(0.25, rel=1e-4)
        got = np.asarray(o.read_region((0, 0), 0, (900, 1100)).convert("RGB")).astype(int)
        got1 = np.asarray(o.read_region((0, 0), 1, (450, 550)).convert("RGB")).astype(int)
    err = np.abs(got - rgb)
    if compression == "zlib":
        assert err.max() == 0
    else:
        assert err.mean() < 1.5
    assert np.abs(got1 - rgb[::2, ::2]).mean() < 2.0
