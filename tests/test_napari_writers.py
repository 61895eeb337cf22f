"""The plugin's npe2 writers (plain functions: no Qt needed): cell tables and label images round-trip."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_ihcscore._writer import write_cells, write_labels


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_cell_table_round_trip(tmp_path, suffix):
    cells = pd.DataFrame({"x_um": [1.5, 20.25], "y_um": [3.0, 4.5], "bin": [0, 3], "class": ["tumour", "other"],
                          "Cell: DAB OD mean": [0.1, 0.7]})
    path = tmp_path / f"cells{suffix}"
    assert write_cells(str(path), cells[["y_um", "x_um"]].to_numpy(), {"features": cells}) == [str(path)]
    back = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    pd.testing.assert_frame_equal(back[cells.columns], cells, check_dtype=False)


def test_labels_round_trip_with_um_scale(tmp_path):
    labels = np.zeros((40, 60), np.int64)
    labels[5:15, 10:30] = 7
    labels[20:35, 40:55] = 70000  # beyond uint16
    path = tmp_path / "nuclei.tif"
    assert write_labels(str(path), labels, {"scale": (0.5, 0.5)}) == [str(path)]
    with tifffile.TiffFile(path) as tf:
        back = tf.asarray()
        page = tf.pages[0]
        x_res = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
    assert back.dtype == np.int32 and np.array_equal(back, labels)
    assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(0.5)  # µm per pixel
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.tif"]  # written through a temporary name


def test_failed_label_write_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(file, *args, **kwargs):  # half a TIFF, then the error
        with open(file, "wb") as f:
            f.write(b"II*\x00half")
        raise OSError("No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_labels(str(tmp_path / "labels.tif"), np.ones((4, 4), np.int32), {"scale": (0.5, 0.5)})
    assert list(tmp_path.iterdir()) == []


def test_labels_saved_from_a_region_open_in_place(tmp_path):
    """A region's labels start at the region: the plugin's reader opens the TIFF as Labels, placed where
    they were (before, it opened as a black RGB 'slide' at the origin)."""
    from napari_ihcscore._reader import read_slide

    labels = np.zeros((30, 50), np.int32)
    labels[5:15, 10:30] = 3
    path = tmp_path / "cells.tif"
    write_labels(str(path), labels, {"scale": (0.5, 0.5), "translate": (12.25, 40.5), "name": "cells"})
    ((data, kwargs, kind),) = read_slide(str(path))
    assert kind == "labels" and kwargs["name"] == "cells"
    assert kwargs["scale"] == (0.5, 0.5) and kwargs["translate"] == (12.25, 40.5)
    assert np.array_equal(data, labels)


def test_hidden_points_are_not_written(tmp_path):
    cells = pd.DataFrame({"x_um": [1.0, 2.0, 3.0], "bin": [0, 1, 2]})
    path = tmp_path / "cells.csv"
    write_cells(str(path), np.zeros((3, 2)), {"features": cells, "shown": np.array([True, False, True])})
    assert pd.read_csv(path)["bin"].tolist() == [0, 2]
