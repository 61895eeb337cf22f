"""Reader: any slide the engine opens, as a lazy multiscale RGB image in µm.

Tiles are read on demand from :meth:`ihcscore.slide.Slide.to_dask_pyramid`;
the layer's ``scale`` is the level-0 pixel size (µm/px), so every coordinate
in the viewer is in µm.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SLIDE_SUFFIXES", "napari_get_reader", "read_slide", "slide_layer_data"]

#: File endings the reader accepts (lower case).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff",
                  ".btf", ".png", ".jpg", ".jpeg", ".bmp")


def napari_get_reader(path):
    """Return :func:`read_slide` when ``path`` looks like a slide, else None.

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    callable or None
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(str(p).lower().endswith(SLIDE_SUFFIXES) for p in paths):
        return None
    return read_slide


def slide_layer_data(slide, mpp_override=None) -> tuple:
    """The ``(data, kwargs, "image")`` layer tuple for an open slide.

    Parameters
    ----------
    slide : ihcscore.slide.Slide
    mpp_override : float, optional
        Recorded in the metadata when the pixel size was assumed.

    Returns
    -------
    tuple
        Lazy pyramid (list of dask arrays, finest first; a single array for
        a one-level image), layer keyword arguments and the layer type.
    """
    levels = slide.to_dask_pyramid()
    mpp = float(slide.mpp)
    metadata = {"ihcscore_path": str(slide.path), "mpp": mpp, "mpp_source": getattr(slide, "mpp_source", None),
                "vendor": getattr(slide, "vendor", None)}
    if mpp_override is not None:
        metadata["ihcscore_mpp_override"] = float(mpp_override)
    kwargs = {
        "name": slide.name,
        "rgb": True,
        "multiscale": len(levels) > 1,
        "scale": (mpp, mpp),
        "units": ("µm", "µm"),  # the scale bar reads µm, not "pixel"
        "metadata": metadata,
        "contrast_limits": (0, 255),
    }
    return (levels if len(levels) > 1 else levels[0], kwargs, "image")


def read_slide(path) -> list[tuple]:
    """Open one or more slides as lazy multiscale RGB image layers.

    Parameters
    ----------
    path : str or list of str

    Returns
    -------
    list of layer data tuples

    Raises
    ------
    ihcscore.slide.SlideError
        One line naming the file and what is wrong (napari shows it as an
        error notification).
    """
    from napari.utils.notifications import show_warning

    from ._slides import open_for_viewer

    from ._writer import read_labels_tiff

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out = []
    for p in paths:
        labels = read_labels_tiff(p) if str(p).lower().endswith((".tif", ".tiff")) else None
        if labels is not None:  # a label image this plugin saved: back as Labels, in place
            out.append(labels)
            continue
        slide, mpp_override, warning = open_for_viewer(p)
        if warning:
            show_warning(warning)
        out.append(slide_layer_data(slide, mpp_override))
    return out
