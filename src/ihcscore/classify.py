"""Tumour vs non-tumour cells.

The default is a transparent rule on nucleus morphology, the features a
pathologist uses at a glance (all measured by :mod:`ihcscore.measure`):

* lymphocytes have small (about 5-7 µm), round, dense nuclei: nucleus area
  below ``lymphocyte_max_area_um2`` *and* circularity at least
  ``lymphocyte_min_circularity``;
* stromal cells (fibroblasts, endothelium) have thin elongated nuclei: minor
  axis below ``stroma_max_minor_axis_um`` *and* eccentricity at least
  ``stroma_min_eccentricity``;
* every other detected cell counts as tumour.

Tumour nuclei in carcinomas are typically 50-150 µm² (8-14 µm long), so the
defaults sit between those populations. Lymphocytes matter for CXCR4: they are
strongly positive and would inflate an all-cell score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["MorphologyRule", "classify_cells", "TUMOUR", "OTHER"]

TUMOUR = "tumour"
OTHER = "other"


@dataclass(frozen=True)
class MorphologyRule:
    """Thresholds of the default rule (µm, µm², unitless shape)."""

    lymphocyte_max_area_um2: float = 38.0
    lymphocyte_min_circularity: float = 0.7
    stroma_max_minor_axis_um: float = 4.5
    stroma_min_eccentricity: float = 0.9

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def classify_cells(table: pd.DataFrame, rule: MorphologyRule = MorphologyRule()) -> np.ndarray:
    """Label each cell ``"tumour"`` or ``"other"`` with the morphology rule.

    Parameters
    ----------
    table : pandas.DataFrame
        Cell measurements (needs ``Nucleus: Area µm^2``, ``Nucleus: Circularity``,
        ``Nucleus: Minor axis µm``, ``Nucleus: Eccentricity``).
    rule : MorphologyRule

    Returns
    -------
    ndarray of str, one per row.
    """
    if len(table) == 0:
        return np.array([], dtype=object)
    area = table["Nucleus: Area µm^2"].to_numpy()
    circ = table["Nucleus: Circularity"].to_numpy()
    minor = table["Nucleus: Minor axis µm"].to_numpy()
    ecc = table["Nucleus: Eccentricity"].to_numpy()
    lymphocyte = (area < rule.lymphocyte_max_area_um2) & (circ >= rule.lymphocyte_min_circularity)
    stroma = (minor < rule.stroma_max_minor_axis_um) & (ecc >= rule.stroma_min_eccentricity)
    return np.where(lymphocyte | stroma, OTHER, TUMOUR).astype(object)
