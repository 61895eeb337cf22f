"""Sample data: the slides in ``sample_slides/`` (``./run demo`` generates the missing ones).

The folder is ``$IHCSCORE_SAMPLE_SLIDES``, else ``sample_slides/`` of the
source checkout this plugin runs from, else ``./sample_slides``. A sample
that is not there falls back to scikit-image's immunohistochemistry image
(0.5 µm/px) held in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["sample_dir", "find_sample", "sample_skimage_ihc", "sample_synthetic_cxcr4_membrane", "sample_os2_ndpi"]

#: Pixel size given to the in-memory scikit-image sample, µm/px.
SKIMAGE_MPP = 0.5
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


def _skimage_in_memory(note: str | None = None) -> list[tuple]:
    from skimage.data import immunohistochemistry

    if note:
        from napari.utils.notifications import show_info

        show_info(note)
    rgb = immunohistochemistry()
    return [(rgb, {"name": "skimage_ihc", "rgb": True, "scale": (SKIMAGE_MPP, SKIMAGE_MPP),
                   "metadata": {"mpp": SKIMAGE_MPP, "ihcscore_path": None, "source": "skimage.data.immunohistochemistry"}},
             "image")]


def _open_or_fallback(stem: str) -> list[tuple]:
    from ._reader import read_slide

    p = find_sample(stem)
    if p is not None:
        return read_slide(str(p))
    return _skimage_in_memory(f"sample {stem!r} not found in sample_slides/ (run ./run demo to generate it); "
                              "showing scikit-image's IHC image at 0.5 µm/px instead")


def sample_skimage_ihc() -> list[tuple]:
    """scikit-image's IHC image (from ``sample_slides/skimage_ihc.*`` when generated)."""
    p = find_sample("skimage_ihc")
    if p is not None:
        from ._reader import read_slide

        return read_slide(str(p))
    return _skimage_in_memory()


def sample_synthetic_cxcr4_membrane() -> list[tuple]:
    """Synthetic CXCR4 slide with membrane DAB (``sample_slides/synthetic_cxcr4_membrane.*``)."""
    return _open_or_fallback("synthetic_cxcr4_membrane")


def sample_os2_ndpi() -> list[tuple]:
    """500 µm Ki67 crop of OpenSlide's OS-2.ndpi (``sample_slides/OS-2-ndpi.ome.tif``)."""
    return _open_or_fallback("OS-2-ndpi")
