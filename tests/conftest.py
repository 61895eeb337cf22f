"""Fixtures shared by the whole-slide test modules (tiling, GPU); a module may define its own of a name."""

import pytest

from ihcscore.preset import load_preset
from ihcscore.synthetic import make_synthetic_slide

#: The shared synthetic slide: 1536² level-0 px at 0.25 µm/px (384 µm, ~350 cells; 768 px at detection).
SLIDE_SIDE_PX = 1536
SLIDE_MPP = 0.25


@pytest.fixture(scope="session")
def preset():
    return load_preset("cxcr4")


@pytest.fixture(scope="session")
def slide_path(tmp_path_factory):
    """A 40x synthetic pyramid (JPEG tiles): detection at 0.5 µm/px reads level 1."""
    path = tmp_path_factory.mktemp("synthetic-slide") / "slide.tif"
    make_synthetic_slide(path, shape=(SLIDE_SIDE_PX, SLIDE_SIDE_PX), mpp=SLIDE_MPP, seed=3)
    return path
