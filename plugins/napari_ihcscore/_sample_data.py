"""Sample data: the slides in ``sample_slides/``, or their in-memory stand-ins where they are absent.

The folder is ``$IHCSCORE_SAMPLE_SLIDES``, else ``sample_slides/`` of the
source checkout this plugin runs from, else ``./sample_slides``. An installed
wheel has no such folder: the synthetic CXCR4 slide is then generated in memory
by :mod:`ihcscore.synthetic` with the parameters ``sample_slides/make_samples.py``
uses (the same pixels before the file's JPEG compression); the OS-2 crop, a real
slide, ships only with a source checkout, and scikit-image's immunohistochemistry
image (0.5 µm/px) is shown instead, with a notice saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["sample_dir", "find_sample", "sample_skimage_ihc", "sample_synthetic_cxcr4_membrane", "sample_os2_ndpi",
           "synthetic_cxcr4_in_memory"]

#: Pixel size given to the in-memory scikit-image sample, µm/px.
SKIMAGE_MPP = 0.5
#: ``synthetic_cxcr4_membrane`` as ``sample_slides/make_samples.py`` makes it (its ``MPP`` and ``SYNTHETIC`` entry).
SYNTHETIC_CXCR4 = {"shape": (2048, 2048), "mpp": 0.5, "seed": 1, "dab_location": "membrane"}
_SUFFIXES = (".ome.tif", ".ome.tiff", ".svs", ".ndpi", ".tif", ".tiff", ".png", ".jpg")


def sample_dir() -> Path | None:
    """The sample slide folder, or None when there is none."""
    env = os.environ.get("IHCSCORE_SAMPLE_SLIDES")
    cands = [Path(env)] if env else []
    cands += [Path(__file__).resolve().parents[2] / "sample_slides", Path.cwd() / "sample_slides"]
    for c in cands:
        if c.is_dir():
            return c
    return None


def find_sample(stem: str) -> Path | None:
    """The file ``<stem><slide suffix>`` in :func:`sample_dir`, if present."""
    d = sample_dir()
    if d is None:
        return None
    for suf in _SUFFIXES:
        p = d / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def _notify(note: str) -> None:
    from napari.utils.notifications import show_info

    show_info(note)


def _skimage_in_memory(note: str | None = None) -> list[tuple]:
    from skimage.data import immunohistochemistry

    if note:
        _notify(note)
    rgb = immunohistochemistry()
    return [(rgb, {"name": "skimage_ihc", "rgb": True, "scale": (SKIMAGE_MPP, SKIMAGE_MPP),
                   "metadata": {"mpp": SKIMAGE_MPP, "ihcscore_path": None, "source": "skimage.data.immunohistochemistry"}},
             "image")]


def _read_sample(stem: str) -> list[tuple] | None:
    from ._reader import read_slide

    p = find_sample(stem)
    return None if p is None else read_slide(str(p))


def synthetic_cxcr4_in_memory() -> list[tuple]:
    """``synthetic_cxcr4_membrane`` rendered in memory by :func:`ihcscore.synthetic.make_synthetic_region`."""
    from ihcscore.synthetic import make_synthetic_region

    kw = dict(SYNTHETIC_CXCR4)
    shape, mpp, seed = kw.pop("shape"), kw.pop("mpp"), kw.pop("seed")
    rgb, _, _ = make_synthetic_region(shape, mpp, seed, **kw)
    return [(rgb, {"name": "synthetic_cxcr4_membrane", "rgb": True, "scale": (mpp, mpp), "units": ("µm", "µm"),
                   "contrast_limits": (0, 255),
                   "metadata": {"mpp": mpp, "ihcscore_path": None,
                                "source": "ihcscore.synthetic (sample_slides/make_samples.py, before JPEG)"}},
             "image")]


def sample_skimage_ihc() -> list[tuple]:
    """scikit-image's IHC image (from ``sample_slides/skimage_ihc.*`` when present)."""
    return _read_sample("skimage_ihc") or _skimage_in_memory()


def sample_synthetic_cxcr4_membrane() -> list[tuple]:
    """Synthetic CXCR4 slide with membrane DAB (``sample_slides/synthetic_cxcr4_membrane.*``, else generated)."""
    return _read_sample("synthetic_cxcr4_membrane") or synthetic_cxcr4_in_memory()


def sample_os2_ndpi() -> list[tuple]:
    """500 µm Ki67 crop of OpenSlide's OS-2.ndpi (``sample_slides/OS-2-ndpi.ome.tif``, source checkout only)."""
    return _read_sample("OS-2-ndpi") or _skimage_in_memory(
        "the OS-2 Ki67 crop (OS-2-ndpi.ome.tif) ships only with a source checkout, in the source repository's "
        "sample_slides/, not with the installed package; showing scikit-image's IHC image at 0.5 µm/px instead")
