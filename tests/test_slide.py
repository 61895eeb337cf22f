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


# --------------------------------------------------------------------------
# open_slide on synthetic files
# --------------------------------------------------------------------------

from ihcscore.slide import Slide, SlideError, open_slide  # noqa: E402

REAL = Path(__file__).parent / "data" / "real"
SAMPLE = Path(__file__).parents[1] / "sample_slides"


def _block_mean(a, k):
    h, w = a.shape[0] // k, a.shape[1] // k
    s = a[: h * k, : w * k].reshape(h, k, w, k, 3).astype(float).mean(axis=(1, 3))
    return np.round(s).astype(np.uint8)


def test_round_trip_levels_mpp_pixels(tmp_path):
    rgb = _gradient(1100, 900)
    path = write_pyramidal_tiff(tmp_path / "rt.tif", rgb, 0.5, compression="zlib", min_level_side=256)
    with open_slide(path) as s:
        assert isinstance(s, Slide)
        assert s.vendor == "aperio" and s.name == "rt"
        assert s.mpp == pytest.approx(0.5)
        assert s.dimensions == (900, 1100)
        assert s.level_count == 3
        assert s.level_dimensions == ((900, 1100), (450, 550), (225, 275))
        assert s.level_downsamples == pytest.approx((1.0, 2.0, 4.0), rel=1e-3)
        assert np.array_equal(s.read_region((0, 0), 0, (900, 1100)), rgb)
        assert np.array_equal(s.read_region((40, 60), 0, (30, 20)), rgb[60:80, 40:70])
        assert s.is_brightfield_rgb


def test_generic_tiff_and_mpp_override(tmp_path):
    rgb = _gradient(600, 500)
    path = write_pyramidal_tiff(tmp_path / "g.tif", rgb, 0.3, compression="zlib", aperio=False)
    with open_slide(path) as s:
        assert s.vendor == "generic-tiff"
        assert s.mpp == pytest.approx(0.3, rel=1e-4)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "argument"


def test_read_outside_bounds_is_white(tmp_path):
    rgb = _gradient(300, 300)
    path = write_pyramidal_tiff(tmp_path / "b.tif", rgb, 0.5, compression="zlib")
    with open_slide(path) as s:
        a = s.read_region((-10, 280), 0, (40, 40))
    assert a.shape == (40, 40, 3)
    assert (a[:, :10] == 255).all() and (a[20:] == 255).all()
    assert np.array_equal(a[:20, 10:], rgb[280:300, 0:30])


def test_read_scaled_matches_manual_downsample(tmp_path):
    rgb = _gradient(1024, 768)
    path = write_pyramidal_tiff(tmp_path / "s.tif", rgb, 0.5, compression="zlib", min_level_side=256)
    png = tmp_path / "s.png"
    import imageio.v3 as iio

    iio.imwrite(png, rgb)
    with open_slide(path) as s, open_slide(png, mpp=0.5) as flat:
        # exact pass-through when the downsample is a level's
        assert np.array_equal(s.read_scaled(128, 256, 512, 512, 4), s.read_region((128, 256), 2, (128, 128)))
        # integer factor from level 0 of a single-level image: area average
        got = flat.read_scaled(64, 128, 400, 600, 2)
        assert got.shape == (300, 200, 3)
        assert np.abs(got.astype(int) - _block_mean(rgb[128:728, 64:464], 2)).max() <= 1
        # non-integer downsample: close to an area average
        got = flat.read_scaled(0, 0, 768, 1024, 3.2)
        assert got.shape == (320, 240, 3)
        from skimage.transform import resize

        ref = resize(rgb.astype(float), (320, 240, 3), anti_aliasing=True, preserve_range=True)
        assert np.abs(got.astype(float) - ref)[5:-5, 5:-5].mean() < 2.0
        th = s.thumbnail(256)
        assert max(th.shape[:2]) == 256


def test_dask_pyramid_reads_tiles(tmp_path):
    rgb = _gradient(700, 600)
    path = write_pyramidal_tiff(tmp_path / "d.tif", rgb, 0.5, compression="zlib", tile=256,
                                min_level_side=256)
    with open_slide(path) as s:
        pyr = s.to_dask_pyramid()
        assert [p.shape for p in pyr] == [(700, 600, 3), (350, 300, 3)]
        assert pyr[0].dtype == np.uint8 and pyr[0].chunksize == (256, 256, 3)
        assert np.array_equal(pyr[0][250:520, 10:300].compute(), rgb[250:520, 10:300])


def test_png_needs_mpp_and_rgba_becomes_rgb(tmp_path):
    import imageio.v3 as iio

    rgba = np.zeros((50, 60, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[:10, :10, 3] = 0  # transparent corner -> white
    iio.imwrite(tmp_path / "t.png", rgba)
    with pytest.raises(SlideError, match=r"t\.png: no pixel size in the file; pass --mpp UM"):
        open_slide(tmp_path / "t.png")
    with open_slide(tmp_path / "t.png", mpp=0.5) as s:
        a = s.read_region((0, 0), 0, (60, 50))
        assert a.shape == (50, 60, 3) and s.mpp == 0.5
        assert (a[:10, :10] == 255).all() and tuple(a[20, 20]) == (200, 100, 50)
        assert s.is_brightfield_rgb


def test_grayscale_opens_but_is_not_brightfield(tmp_path):
    import tifffile

    gray = (np.arange(200 * 300) % 251).reshape(200, 300).astype(np.uint16) * 200
    tifffile.imwrite(tmp_path / "dapi.tif", gray, resolution=(1e4 / 0.65, 1e4 / 0.65),
                     resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "dapi.tif") as s:
        assert s.mpp == pytest.approx(0.65, rel=1e-4)
        a = s.read_region((0, 0), 0, (300, 200))
        assert a.shape == (200, 300, 3) and a.dtype == np.uint8
        assert not s.is_brightfield_rgb and s.modality == "grayscale"


def test_unsupported_channel_layout(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "five.tif", np.zeros((5, 40, 40), np.uint8), metadata={"axes": "CYX"})
    with pytest.raises(SlideError, match="five.tif.*channel"):
        open_slide(tmp_path / "five.tif", mpp=0.5)


def _assert_one_line_error(path, what):
    with pytest.raises(SlideError) as info:
        open_slide(path, mpp=0.5)
    msg = str(info.value)
    assert Path(path).name in msg and "\n" not in msg, msg
    assert what in msg.lower(), msg
    assert isinstance(info.value, ValueError)


def test_bad_files_raise_one_line_errors(tmp_path):
    _assert_one_line_error(tmp_path / "missing.svs", "no such file")
    (tmp_path / "folder.tif").mkdir()
    _assert_one_line_error(tmp_path / "folder.tif", "directory")
    (tmp_path / "notes.tif").write_text("this is not an image\nreally\n")
    _assert_one_line_error(tmp_path / "notes.tif", "not a readable")
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_one_line_error(tmp_path / "empty.png", "empty")
    full = write_pyramidal_tiff(tmp_path / "full.tif", _gradient(600, 600), 0.5, compression="jpeg")
    data = full.read_bytes()
    for cut in (len(data) // 2, 200):
        (tmp_path / "cut.tif").write_bytes(data[:cut])
        _assert_one_line_error(tmp_path / "cut.tif", "truncated")


# --------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------

def test_real_svs_aperio():
    with open_slide(REAL / "CMU-1-Small-Region.svs") as s:
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.dimensions == (2220, 2967) and s.level_count == 1
        assert s.properties["openslide.objective-power"] == "20"
        assoc = s.associated_images
        assert set(assoc) == {"thumbnail", "label", "macro"}
        assert assoc["macro"].shape == (431, 1280, 3) and assoc["macro"].dtype == np.uint8
        assert s.is_brightfield_rgb
        assert s.read_region((1000, 1000), 0, (64, 64)).mean() < 250  # tissue, not padding


def test_real_ndpi_fluorescence():
    with open_slide(REAL / "stritt-test3-DAPI.ndpi") as s:
        assert s.vendor == "hamamatsu"
        assert s.mpp == pytest.approx(0.2282, abs=5e-4)
        assert s.dimensions == (3968, 4864)
        # OpenSlide exposes 7 levels (4 stored pyramid levels plus JPEG-scaled ones)
        assert s.level_count >= 4 and s.level_downsamples[:4] == pytest.approx((1, 2, 4, 8))
        assert "macro" in s.associated_images
        # stored as 3-channel JPEG, but a dark DAPI image: not brightfield
        assert s.modality == "fluorescence" and not s.is_brightfield_rgb


def test_real_ome_tiff_mpp_from_metadata():
    with open_slide(SAMPLE / "OS-2-ndpi.ome.tif") as s:
        assert s.vendor == "ome-tiff" and s.name == "OS-2-ndpi"
        assert s.mpp == pytest.approx(0.2271, abs=1e-4)
        assert s.mpp_source == "OME PhysicalSizeX"
        assert s.dimensions == (2202, 2202)
        a = s.read_region((600, 600), 0, (512, 512))
        assert a.shape == (512, 512, 3) and 100 < a.mean() < 240
        assert s.is_brightfield_rgb


def test_real_endonuke_png_needs_mpp():
    png = sorted((REAL / "endonuke" / "images").glob("*.png"))[0]
    with pytest.raises(SlideError, match="no pixel size"):
        open_slide(png)
    with open_slide(png, mpp=0.5) as s:
        assert s.dimensions == (200, 200) and s.read_region((0, 0), 0, (200, 200)).shape == (200, 200, 3)


def test_tifffile_fallback_reads_pyramid_levels(tmp_path, monkeypatch):
    """Without OpenSlide's help the tifffile reader finds the same levels and pixels."""
    openslide = pytest.importorskip("openslide")
    monkeypatch.setattr(openslide.OpenSlide, "detect_format", classmethod(lambda cls, p: None))
    rgb = _gradient(1100, 900)
    path = write_pyramidal_tiff(tmp_path / "f.tif", rgb, 0.5, compression="jpeg", min_level_side=256)
    with open_slide(path) as s:
        assert s.vendor == "aperio-svs" and s.mpp == pytest.approx(0.5)
        assert s.level_dimensions == ((900, 1100), (450, 550), (225, 275))
        assert np.abs(s.read_region((0, 0), 0, (900, 1100)).astype(int) - rgb).mean() < 1.5
        # tiles read concurrently through dask's threaded scheduler
        level1 = s.to_dask_pyramid()[1].compute(scheduler="threads", num_workers=4)
        assert np.abs(level1.astype(int) - rgb[::2, ::2]).mean() < 2.0


def test_rgba_to_rgb_composites_on_white_and_passes_opaque_pixels_through():
    from ihcscore.slide import _to_rgb_uint8

    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    assert np.array_equal(_to_rgb_uint8(rgba), rgba[..., :3])  # opaque: the colours unchanged
    rgba[:5, :, 3] = 0
    rgba[5:10, :, 3] = 128
    out = _to_rgb_uint8(rgba)
    assert np.all(out[:5] == 255)  # transparent: glass white
    expect = np.round((rgba[5:10, :, :3] * 128.0 + 255.0 * 127) / 255).astype(np.uint8)
    assert np.abs(out[5:10].astype(int) - expect).max() <= 1
    assert np.array_equal(out[10:], rgba[10:, :, :3])


# --------------------------------------------------------------------------
# Tile reader: tifffile decoding in place of OpenSlide's read_region
# --------------------------------------------------------------------------

class _NoOpenSlide:
    """Stands in for OpenSlide in a backend whose reads must all be decoded by tifffile."""

    def __init__(self, osr):
        self._osr = osr

    def read_region(self, *args):
        raise AssertionError("read fell back to OpenSlide")

    def close(self):
        self._osr.close()


def _openslide_rgb(osr, level, x, y, w, h):
    """OpenSlide's own pixels inside the level, made RGB as the slide reader does; white outside."""
    from ihcscore.slide import _to_rgb_uint8

    lw, lh = osr.level_dimensions[level]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    out = np.full((h, w, 3), 255, np.uint8)
    if x1 > x0 and y1 > y0:
        ds = osr.level_downsamples[level]
        a = osr.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        out[y0 - y:y1 - y, x0 - x:x1 - x] = _to_rgb_uint8(np.asarray(a))
    return out


def _regions(lw, lh, tile, rng, n=12):
    """Edge cases (1x1, corners, edge tiles, tile seams, across the right/bottom edges) and random regions."""
    fixed = [(0, 0, 1, 1), (lw - 1, lh - 1, 1, 1), (lw - 5, lh - 7, 5, 7), (0, 0, lw, lh),
             (tile - 1, tile - 1, 2, 2), (tile, tile, tile, tile), (lw - 30, 10, 60, 50),
             (10, lh - 30, 50, 60), (lw - tile // 2, lh - tile // 2, tile, tile), (-10, -10, 40, 40)]
    rand = [(int(rng.integers(-20, lw)), int(rng.integers(-20, lh)),
             int(rng.integers(1, lw + 1)), int(rng.integers(1, lh + 1))) for _ in range(n)]
    return fixed + rand


def _assert_same_as_openslide(path, fast_levels):
    openslide = pytest.importorskip("openslide")
    rng = np.random.default_rng(0)
    with open_slide(path) as s, openslide.OpenSlide(str(path)) as osr:
        b = s._backend
        assert [p is not None for p in b._pages] == fast_levels
        if all(fast_levels):
            b.osr = _NoOpenSlide(b.osr)
        for level, (lw, lh) in enumerate(s.level_dimensions):
            for x, y, w, h in _regions(lw, lh, b.tile_sizes[level], rng):
                got = s._read_level_padded(level, x, y, w, h)
                assert got.shape == (h, w, 3) and got.dtype == np.uint8
                assert np.array_equal(got, _openslide_rgb(osr, level, x, y, w, h)), (level, x, y, w, h)


def _textured(h, w):
    rgb = _gradient(h, w)
    rgb[300:700, 200:600] = np.random.default_rng(1).integers(0, 256, rgb[300:700, 200:600].shape, dtype=np.uint8)
    return rgb


@pytest.mark.parametrize("compression", ["jpeg", "zlib", None])
@pytest.mark.parametrize("aperio", [True, False])
def test_tile_reader_matches_openslide(tmp_path, compression, aperio):
    path = write_pyramidal_tiff(tmp_path / "t.tif", _textured(1100, 900), 0.5, compression=compression,
                                aperio=aperio, min_level_side=256)
    _assert_same_as_openslide(path, [True, True, True])


def test_tile_reader_matches_openslide_real_svs():
    # Aperio JPEG tiles (RGB, 4:2:0 chroma, JPEGTables), 240 px tiles, edge tiles on both sides
    _assert_same_as_openslide(REAL / "CMU-1-Small-Region.svs", [True])


def test_tile_reader_matches_openslide_with_pillow_jpeg(tmp_path, monkeypatch):
    """The Pillow JPEG decoder (used when imagecodecs is missing) gives OpenSlide's pixels too."""
    from tifffile import tifffile as _tf

    from ihcscore import slide as slide_mod

    calls = []

    def decode(*args, **kwargs):
        calls.append(1)
        return slide_mod._pil_jpeg_decode(*args, **kwargs)

    monkeypatch.setattr(_tf.imagecodecs, "jpeg_decode", decode)
    path = write_pyramidal_tiff(tmp_path / "p.tif", _textured(1100, 900), 0.5, compression="jpeg",
                                min_level_side=256)
    _assert_same_as_openslide(path, [True, True, True])
    _assert_same_as_openslide(REAL / "CMU-1-Small-Region.svs", [True])
    assert calls


def test_tile_reader_leaves_non_integer_downsamples_to_openslide(tmp_path):
    # 1101 x 901 px: levels 551 x 451 and 276 x 226 have downsamples just under 2 and 4, at which
    # OpenSlide resamples the tiles
    path = write_pyramidal_tiff(tmp_path / "o.tif", _textured(1101, 901), 0.5, compression="zlib",
                                tile=128, min_level_side=200)
    _assert_same_as_openslide(path, [True, False, False])


def _drop_tiles(path, page, tiles):
    """Set TileByteCounts of some tiles of a TIFF page to 0 (missing tiles, as in sparse slides)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[page].tags["TileByteCounts"]
        size = {"H": 2, "I": 4, "Q": 8}[tifffile.TIFF.DATA_FORMATS[tag.dtype][-1]]
        pos = tag.valueoffset
    with open(path, "r+b") as fh:
        for i in tiles:
            fh.seek(pos + i * size)
            fh.write(bytes(size))


@pytest.mark.parametrize("aperio,page,fast_levels", [
    (False, 0, [True, True, True]),
    (False, 1, [True, True, True]),
    # OpenSlide's Aperio reader redraws missing tiles of reduced levels from the finer level
    (True, 0, [True, False, False]),
    (True, 1, [True, False, False]),
])
def test_tile_reader_missing_tiles(tmp_path, aperio, page, fast_levels):
    path = write_pyramidal_tiff(tmp_path / "m.tif", _textured(1100, 900), 0.5, compression="jpeg",
                                aperio=aperio, min_level_side=256)
    _drop_tiles(path, page, (0, 3))
    _assert_same_as_openslide(path, fast_levels)
    if page == 0:
        with open_slide(path) as s:
            assert (s.read_region((0, 0), 0, (256, 256)) == 255).all()  # a missing tile is glass


def test_tile_reader_falls_back_to_openslide():
    from types import SimpleNamespace

    from ihcscore.slide import _is_plain_rgb_tiled

    with open_slide(REAL / "stritt-test3-DAPI.ndpi") as s:
        assert s.vendor == "hamamatsu" and s._backend._pages == [None] * s.level_count
        assert s.read_region((1000, 1000), 0, (64, 64)).shape == (64, 64, 3)
    page = SimpleNamespace(is_tiled=True, planarconfig=1, samplesperpixel=3, bitspersample=8,
                           sampleformat=1, imagedepth=1, predictor=1, compression=7, photometric=6)
    assert _is_plain_rgb_tiled(page)
    for change in ({"compression": 33003}, {"compression": 33005}, {"compression": 34712},
                   {"planarconfig": 2}, {"samplesperpixel": 4}, {"bitspersample": 16},
                   {"predictor": 2}, {"is_tiled": False}, {"photometric": 8}, {"compression": 8, "photometric": 6}):
        assert not _is_plain_rgb_tiled(SimpleNamespace(**{**vars(page), **change})), change


def test_tile_reader_decode_error_falls_back(tmp_path):
    openslide = pytest.importorskip("openslide")
    path = write_pyramidal_tiff(tmp_path / "e.tif", _textured(600, 500), 0.5, compression="jpeg")
    with open_slide(path) as s, openslide.OpenSlide(str(path)) as osr:
        page = s._backend._pages[0]
        assert page is not None

        def broken(*args, **kwargs):
            raise ValueError("corrupt tile")

        page.decode = broken
        assert np.array_equal(s.read_region((30, 40), 0, (300, 200)), _openslide_rgb(osr, 0, 30, 40, 300, 200))


def test_tile_reader_threads(tmp_path):
    rgb = _textured(1100, 900)
    path = write_pyramidal_tiff(tmp_path / "c.tif", rgb, 0.5, compression="zlib", min_level_side=256)
    with open_slide(path) as s:
        assert s._backend._pages[0] is not None
        level0 = s.to_dask_pyramid()[0].compute(scheduler="threads", num_workers=4)
    assert np.array_equal(level0, rgb)


# --------------------------------------------------------------------------
# Pixel size from every source, checked; samples OpenSlide cannot decode
# --------------------------------------------------------------------------

def _ome(path, rgb, tiled, **sizes):
    import tifffile

    md = {"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm",
          "PhysicalSizeY": 0.5, "PhysicalSizeYUnit": "µm", **sizes}
    tifffile.imwrite(path, rgb, photometric="rgb", metadata=md, **({"tile": (256, 256)} if tiled else {}))
    return path


@pytest.mark.parametrize("tiled", [False, True])
def test_ome_tiff_mpp_from_ome_xml_tiled_or_not(tmp_path, tiled):
    """A tiled OME-TIFF is OpenSlide's generic TIFF: its pixel size is still the OME-XML's PhysicalSizeX."""
    rgb = _gradient(600, 500)
    with open_slide(_ome(tmp_path / "o.ome.tif", rgb, tiled)) as s:
        if tiled:
            pytest.importorskip("openslide")
            assert s.vendor == "generic-tiff"
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "OME PhysicalSizeX"
        assert np.array_equal(s.read_region((0, 0), 0, (500, 600)), rgb)
    nm = _ome(tmp_path / "nm.ome.tif", rgb, tiled, PhysicalSizeX=250, PhysicalSizeXUnit="nm",
              PhysicalSizeY=250, PhysicalSizeYUnit="nm")
    with open_slide(nm) as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "OME PhysicalSizeX"


def _resolution_tiff(path, mpp_x, mpp_y, tiled):
    import tifffile

    tifffile.imwrite(path, _gradient(600, 500), photometric="rgb", resolution=(1e4 / mpp_x, 1e4 / mpp_y),
                     resolutionunit="CENTIMETER", **({"tile": (256, 256)} if tiled else {}))
    return path


@pytest.mark.parametrize("tiled", [False, True])
def test_non_square_pixels_are_refused(tmp_path, tiled):
    rgb = _gradient(600, 500)
    files = [_resolution_tiff(tmp_path / "res.tif", 0.5, 1.0, tiled),
             _ome(tmp_path / "ome.ome.tif", rgb, tiled, PhysicalSizeY=1.0)]
    if not tiled:
        from PIL import Image

        Image.fromarray(rgb).save(tmp_path / "dpi.png", dpi=(50800, 25400))
        files.append(tmp_path / "dpi.png")
    for path in files:
        with pytest.raises(SlideError) as info:
            open_slide(path)
        msg = str(info.value)
        assert msg == f"{path}: pixels are not square (0.5 x 1 µm); resample the image to square pixels", msg
        with open_slide(path, mpp=0.5) as s:  # an explicit pixel size overrides the file's, as for any other
            assert s.mpp == 0.5 and s.mpp_source == "argument"
    # within 1 %: square (rounding in the metadata)
    for path in (_resolution_tiff(tmp_path / "near.tif", 0.5, 0.504, tiled),
                 _ome(tmp_path / "near.ome.tif", rgb, tiled, PhysicalSizeY=0.504)):
        with open_slide(path) as s:
            assert s.mpp == pytest.approx(0.5)


def _aperio_tiff(path, mpp_text, tiled):
    """An Aperio description with ``MPP = mpp_text``: OpenSlide reads it tiled, tifffile stripped."""
    import tifffile

    tifffile.imwrite(path, _gradient(600, 500), photometric="rgb", compression="zlib", metadata=None,
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                     description=f"Aperio Image Library ihcscore\n500x600 [0,0 500x600] (256x256) ZLIB/RGB"
                                 f"|AppMag = 20|MPP = {mpp_text}",
                     **({"tile": (256, 256)} if tiled else {}))
    return path


@pytest.mark.parametrize("tiled", [False, True])
def test_implausible_or_unreadable_mpp_in_the_file_is_one_line_error(tmp_path, tiled):
    cases = [(_aperio_tiff(tmp_path / "dot.tif", ".", tiled), "'.'"),
             (_aperio_tiff(tmp_path / "neg.tif", "-0.5", tiled), "-0.5 µm/px"),
             (_aperio_tiff(tmp_path / "huge.tif", "5000", tiled), "5000 µm/px"),
             (_ome(tmp_path / "huge.ome.tif", _gradient(600, 500), tiled, PhysicalSizeX=5000,
                   PhysicalSizeY=5000), "5000 µm/px"),
             (_ome(tmp_path / "zero.ome.tif", _gradient(600, 500), tiled, PhysicalSizeX=1e-9,
                   PhysicalSizeY=1e-9), "1e-09 µm/px")]
    for path, value in cases:
        with pytest.raises(SlideError) as info:
            open_slide(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        assert value in msg and msg.endswith("pass --mpp UM"), msg
        with open_slide(path, mpp=0.5) as s:  # what the message says to do works
            assert s.mpp == 0.5
    with open_slide(_aperio_tiff(tmp_path / "ok.tif", "0.25", tiled)) as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.vendor == ("aperio" if tiled else "aperio-svs")
    with open_slide(_aperio_tiff(tmp_path / "comma.tif", "0,25", tiled)) as s:  # a decimal comma, either way
        assert s.mpp == pytest.approx(0.25)


def test_mpp_argument_outside_the_plausible_range_is_one_line_error(tmp_path):
    path = _resolution_tiff(tmp_path / "a.tif", 0.5, 0.5, False)
    for bad in (0, -0.5, float("nan"), float("inf"), 1e-9, 1e300, "1e400"):
        with pytest.raises(SlideError) as info:
            open_slide(path, mpp=bad)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        assert "outside the accepted range 0.02–20 µm/px" in msg, msg
    with pytest.raises(SlideError, match=r"a\.tif: mpp must be a number of µm/px, got 'x'"):
        open_slide(path, mpp="x")
    for ok in (0.02, 20, "0.5"):
        with open_slide(path, mpp=ok) as s:
            assert s.mpp == float(ok) and s.mpp_source == "argument"


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "uint32"])
def test_tiled_tiff_with_samples_openslide_cannot_decode_reads_through_tifffile(tmp_path, dtype):
    import tifffile

    rgb = _gradient(600, 500)
    data = (rgb / 255.0).astype(dtype) if dtype.startswith("float") else rgb.astype(dtype) << 24
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=(256, 256), resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        got = s.read_region((0, 0), 0, (500, 600))
        assert s.vendor == "tiff" and s.mpp == pytest.approx(0.5)
    assert np.abs(got.astype(int) - rgb).max() <= 1


@pytest.mark.parametrize("tile", [None, (256, 256)])
def test_a_window_of_a_float_image_reads_as_the_whole_image_maps_it(tmp_path, tile):
    """How samples map to 0-255 is decided once per image: one pixel above 1.0 in a 0-1 float image used to
    turn every window holding it black (and the same pixels read differently in another window)."""
    import tifffile

    rgb = _gradient(600, 500)
    data = (rgb / 255.0).astype(np.float32)
    data[590, 490] = 1.0001  # far from the window read below
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=tile, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        alone = s.read_region((100, 100), 0, (128, 128))
        inside = s.read_region((0, 0), 0, (500, 600))[100:228, 100:228]
    np.testing.assert_array_equal(alone, inside)
    assert np.abs(alone.astype(int) - rgb[100:228, 100:228]).max() <= 1


@pytest.mark.parametrize("tile", [None, (256, 256)])
@pytest.mark.parametrize("kind", ["8-bit in uint16", "12-bit in uint16", "full uint16", "float with a hot pixel",
                                  "8-bit in uint16 with opaque alpha"])
def test_wider_samples_read_as_their_8_bit_image(tmp_path, tile, kind):
    """16-bit slides (tiled ones too: OpenSlide's decoder kept only their high byte, so 8- or 12-bit data
    turned black) and float slides map to 0-255 by the bits the data uses, decided once, robust to a hot
    pixel."""
    import tifffile

    rgb = _gradient(600, 500)
    data = {"8-bit in uint16": rgb.astype(np.uint16), "12-bit in uint16": rgb.astype(np.uint16) << 4,
            "full uint16": rgb.astype(np.uint16) * 257, "float with a hot pixel": rgb / 255.0,
            "8-bit in uint16 with opaque alpha": np.dstack([rgb.astype(np.uint16),
                                                             np.full(rgb.shape[:2], 65535, np.uint16)])}[kind]
    if kind.startswith("float"):
        data[5, 5] = 40.0
    path = tmp_path / "w.tif"
    tifffile.imwrite(path, data, photometric="rgb", tile=tile, resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                     **({"extrasamples": ["unassalpha"]} if data.shape[-1] == 4 else {}))
    with open_slide(path) as s:
        got = s.read_region((0, 0), 0, (500, 600))
    diff = np.abs(got.astype(int) - rgb)
    diff[5, 5] = 0
    assert diff.max() <= 1


def test_associated_alpha_is_composited_over_white(tmp_path):
    """A stripped RGBA TIFF with associated (premultiplied) alpha: over white it reads as the scanner saw it
    (a half-transparent band read 181 where 235.5 is right)."""
    import tifffile

    rgb = np.full((64, 64, 3), 216, np.uint8)
    alpha = np.full((64, 64, 1), 255, np.uint8)
    alpha[20:40] = 128
    premult = (rgb.astype(np.uint16) * alpha // 255).astype(np.uint8)
    path = tmp_path / "assoc.tif"
    tifffile.imwrite(path, np.concatenate([premult, alpha], axis=-1), photometric="rgb", extrasamples=[1],
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        got = s.read_region((0, 0), 0, (64, 64)).astype(int)
    want = np.round(216 * 128 / 255 + 255 * (1 - 128 / 255))  # composite over white
    assert abs(got[30, 30, 0] - want) <= 1 and got[5, 5, 0] == 216
