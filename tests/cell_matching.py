"""Matching the cells of two runs on the same image (a helper of the test modules, not a test)."""

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree


def match_cells(ref: pd.DataFrame, other: pd.DataFrame, tol_px: float):
    """Indices into ``ref`` and ``other`` of mutual nearest centroids (``x_px``, ``y_px``) closer than ``tol_px``."""
    a = ref[["x_px", "y_px"]].to_numpy()
    b = other[["x_px", "y_px"]].to_numpy()
    d_ab, i_ab = cKDTree(a).query(b)
    _, i_ba = cKDTree(b).query(a)
    ok = (d_ab < tol_px) & (i_ba[i_ab] == np.arange(len(b)))
    return i_ab[ok], np.nonzero(ok)[0]
