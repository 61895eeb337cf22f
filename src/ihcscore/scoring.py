"""Intensity bins and slide scores: H-score, percent positive, Allred, IRS.

Scoring contract (see ``DESIGN.md``), every number configurable through a
:class:`ScoringScheme`:

* A cell is binned on one DAB OD measurement (OD units, e.g. ``"Cell: DAB OD
  mean"``): negative ``< t1``, 1+ ``[t1, t2)``, 2+ ``[t2, t3)``, 3+ ``>= t3``.
  With a single threshold (QuPath's "single threshold") cells are negative
  ``< t1`` or positive ``>= t1`` only.
* A cell whose measurement is NaN (e.g. an empty cytoplasm when the cell
  expansion is 0) gets bin ``-1``: *unscored*. Unscored cells are excluded
  from every count, from ``n`` and from every percentage.
* H-score = (1·n1 + 2·n2 + 3·n3) / n × 100 over the scored cells, range 0-300.
  Percent positive = (n1 + n2 + n3) / n × 100. With 0 scored cells every score
  is ``None`` (undefined), never 0.
* Single threshold: ``percent_positive`` is reported, ``n_1`` holds the
  positive cells, and ``n_2``, ``n_3``, ``h_score``, ``allred`` and ``irs`` are
  ``None`` (these categories do not exist without three thresholds).
* Allred = proportion score (0-5) + intensity score (0-3), see
  :func:`allred_score`. IRS (Remmele) = percentage score (0-4) × intensity
  score (0-3), see :func:`irs_score`. Both use the *same* intensity score:
  the mean bin of the positive cells mapped to 1-3 (:func:`intensity_score`).

Every value returned is a plain Python ``int``, ``float`` or ``None`` so the
results serialise to JSON as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Sequence

import numpy as np

__all__ = [
    "COMPARTMENTS",
    "STATISTICS",
    "CELL_GROUPS",
    "UNSCORED",
    "ScoringScheme",
    "measurement_name",
    "validate_thresholds",
    "assign_bins",
    "score_counts",
    "intensity_score",
    "allred_proportion_score",
    "allred_score",
    "irs_percentage_score",
    "irs_score",
    "summarize",
    "headline",
]

#: Cell compartments, in the order they are reported.
COMPARTMENTS = ("nucleus", "cytoplasm", "membrane", "cell")
#: DAB OD statistics a cell can be scored on.
STATISTICS = ("mean", "max")
#: Which cells the headline score uses.
CELL_GROUPS = ("tumour", "all")
#: Bin value of a cell whose measurement is NaN (excluded from all counts).
UNSCORED = -1


def measurement_name(compartment: str, statistic: str = "mean") -> str:
    """QuPath-style column name of a DAB OD measurement.

    >>> measurement_name("cell")
    'Cell: DAB OD mean'
    >>> measurement_name("nucleus", "max")
    'Nucleus: DAB OD max'
    """
    if compartment not in COMPARTMENTS:
        raise ValueError(f"compartment must be one of {', '.join(COMPARTMENTS)}; got {compartment!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}")
    return f"{compartment.capitalize()}: DAB OD {statistic}"


def validate_thresholds(thresholds) -> tuple[float, ...]:
    """Check and normalise bin thresholds (OD units).

    Parameters
    ----------
    thresholds : float or sequence of float
        One value (positive/negative only) or three strictly increasing
        finite values ``t1 < t2 < t3``.

    Returns
    -------
    tuple of float

    Raises
    ------
    ValueError
        With a message saying what is wrong.
    """
    if isinstance(thresholds, (Real, np.number)) and not isinstance(thresholds, (bool, np.bool_)):
        thresholds = (thresholds,)
    if isinstance(thresholds, (str, bytes)):
        raise ValueError(f"thresholds must be numbers, got the string {thresholds!r}")
    try:
        items = list(thresholds)
    except TypeError:
        raise ValueError(f"thresholds must be one number or a list of 1 or 3 numbers, got {thresholds!r}") from None
    if len(items) not in (1, 3):
        raise ValueError(f"thresholds must be 1 value (positive/negative) or 3 values (1+/2+/3+); got {len(items)}: {items}")
    out = []
    for t in items:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (Real, np.number)):
            raise ValueError(f"thresholds must be numbers, got {t!r}")
        t = float(t)
        if not math.isfinite(t):
            raise ValueError(f"thresholds must be finite, got {items}")
        out.append(t)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"thresholds must be strictly increasing, got {out}")
    return tuple(out)


@dataclass(frozen=True)
class ScoringScheme:
    """What each cell is scored on and how.

    Parameters
    ----------
    compartment : {"nucleus", "cytoplasm", "membrane", "cell"}
        Compartment whose DAB OD is binned for the headline score.
    statistic : {"mean", "max"}
        DAB OD statistic over the compartment's pixels.
    thresholds : sequence of float
        Bin thresholds in OD units: 1 value or 3 strictly increasing values.
    cells : {"tumour", "all"}
        Which cells the headline score uses (both groups are always reported).
    """

    compartment: str = "cell"
    statistic: str = "mean"
    thresholds: tuple[float, ...] = (0.2, 0.4, 0.6)
    cells: str = "tumour"

    def __post_init__(self):
        if self.compartment not in COMPARTMENTS:
            raise ValueError(
                f"compartment must be one of {', '.join(COMPARTMENTS)}; got {self.compartment!r}"
            )
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}; got {self.statistic!r}")
        if self.cells not in CELL_GROUPS:
            raise ValueError(f"cells must be one of {', '.join(CELL_GROUPS)}; got {self.cells!r}")
        object.__setattr__(self, "thresholds", validate_thresholds(self.thresholds))

    @property
    def measurement(self) -> str:
        """Column scored for the headline, e.g. ``"Cell: DAB OD mean"``."""
        return measurement_name(self.compartment, self.statistic)

    def measurement_for(self, compartment: str) -> str:
        """Column of the same statistic for another compartment."""
        return measurement_name(compartment, self.statistic)

    @property
    def single_threshold(self) -> bool:
        """True when cells are only positive or negative."""
        return len(self.thresholds) == 1

    def to_dict(self) -> dict:
        return {
            "compartment": self.compartment,
            "statistic": self.statistic,
            "thresholds": list(self.thresholds),
            "cells": self.cells,
        }


def assign_bins(values, thresholds: Sequence[float] = (0.2, 0.4, 0.6)) -> np.ndarray:
    """Intensity bin of each cell.

    Parameters
    ----------
    values : array_like of float
        DAB OD measurement per cell (OD units).
    thresholds : sequence of float
        1 or 3 strictly increasing thresholds (OD units).

    Returns
    -------
    bins : int8 array, same shape as ``values``
        0 negative (``< t1``), 1 (``[t1, t2)``), 2 (``[t2, t3)``), 3
        (``>= t3``); with one threshold 0 (``< t1``) or 1 (``>= t1``).
        A value exactly on a threshold goes to the higher bin. NaN gives
        ``-1`` (:data:`UNSCORED`): the cell is excluded from all counts.
    """
    t = np.asarray(validate_thresholds(thresholds), dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    bins = np.searchsorted(t, v, side="right").astype(np.int8)
    bins[np.isnan(v)] = UNSCORED
    return bins


def intensity_score(mean_positive_bin) -> int:
    """Intensity score 0-3 from the mean bin (1-3) of the positive cells.

    ``> 7/3`` -> 3, ``> 5/3`` -> 2, otherwise 1; ``None`` or NaN (no positive
    cell) -> 0. Used by both Allred and IRS.
    """
    if mean_positive_bin is None or not math.isfinite(float(mean_positive_bin)):
        return 0
    m = float(mean_positive_bin)
    if m <= 0:
        return 0
    if m > 7 / 3:
        return 3
    if m > 5 / 3:
        return 2
    return 1


def _check_percent(p) -> float:
    p = float(p)
    if not (0.0 <= p <= 100.0):
        raise ValueError(f"percent positive must be in [0, 100], got {p}")
    return p


def allred_proportion_score(percent_positive: float) -> int:
    """Allred proportion score 0-5.

    0: none (0 %); 1: ``(0, 1)`` %; 2: ``[1, 10)`` %; 3: ``[10, 33)`` %;
    4: ``[33, 66)`` %; 5: ``>= 66`` %. Each boundary belongs to the higher
    score.
    """
    p = _check_percent(percent_positive)
    if p == 0:
        return 0
    for score, upper in ((1, 1.0), (2, 10.0), (3, 33.0), (4, 66.0)):
        if p < upper:
            return score
    return 5


def allred_score(percent_positive, mean_positive_bin) -> int | None:
    """Allred score 0-8: proportion score + intensity score.

    Parameters
    ----------
    percent_positive : float or None
        Positive cells in percent of scored cells; None (no scored cell)
        gives None.
    mean_positive_bin : float or None
        Mean bin (1-3) of the positive cells; None when none is positive.

    Returns
    -------
    int or None
        0 when no cell is positive, otherwise 2-8.
    """
    if percent_positive is None:
        return None
    ps = allred_proportion_score(percent_positive)
    return ps + (intensity_score(mean_positive_bin) if ps > 0 else 0)


def irs_percentage_score(percent_positive: float) -> int:
    """IRS (Remmele) percentage score 0-4.

    0: 0 %; 1: ``(0, 10)`` %; 2: ``[10, 50]`` %; 3: ``(50, 80]`` %; 4:
    ``> 80`` %. The published "51-80 %" band is read as ``(50, 80]`` so that
    every percentage has a score.
    """
    p = _check_percent(percent_positive)
    if p == 0:
        return 0
    if p < 10:
        return 1
    if p <= 50:
        return 2
    if p <= 80:
        return 3
    return 4


def irs_score(percent_positive, intensity) -> int | None:
    """Immunoreactive score (Remmele): percentage score × intensity, 0-12.

    Parameters
    ----------
    percent_positive : float or None
        Positive cells in percent of scored cells; None gives None.
    intensity : int
        Intensity score 0-3; :func:`score_counts` passes the same intensity
        score Allred uses (:func:`intensity_score` of the mean positive bin).
    """
    if percent_positive is None:
        return None
    intensity = int(intensity)
    if not 0 <= intensity <= 3:
        raise ValueError(f"IRS intensity must be 0-3, got {intensity}")
    return irs_percentage_score(percent_positive) * intensity


def score_counts(bins, n_thresholds: int = 3) -> dict:
    """Counts and scores of a set of binned cells.

    Parameters
    ----------
    bins : array_like of int
        Bins from :func:`assign_bins`; ``-1`` (unscored) is ignored.
    n_thresholds : {1, 3}
        Number of thresholds the bins came from.

    Returns
    -------
    dict
        ``n`` (scored cells), ``n_0``, ``n_1``, ``n_2``, ``n_3`` (cells per
        bin), ``h_score`` (0-300), ``percent_positive`` (0-100), ``allred``
        (0-8), ``irs`` (0-12). With ``n == 0`` all scores are None. With a
        single threshold ``n_1`` is the positive cells and ``n_2``, ``n_3``,
        ``h_score``, ``allred``, ``irs`` are None.
    """
    if n_thresholds not in (1, 3):
        raise ValueError(f"n_thresholds must be 1 or 3, got {n_thresholds}")
    b = np.asarray(bins).ravel()
    if b.size and not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"bins must be integers, got dtype {b.dtype}")
    b = b[b != UNSCORED]
    top = n_thresholds
    if b.size and (b.min() < 0 or b.max() > top):
        raise ValueError(f"bins must be in -1..{top} for {n_thresholds} threshold(s), got {sorted(set(b.tolist()))}")
    counts = np.bincount(b.astype(np.int64), minlength=4)
    n = int(b.size)
    n0, n1, n2, n3 = (int(c) for c in counts[:4])
    n_pos = n1 + n2 + n3
    percent = 100.0 * n_pos / n if n else None
    out = {"n": n, "n_0": n0, "n_1": n1, "n_2": n2, "n_3": n3,
           "h_score": None, "percent_positive": percent, "allred": None, "irs": None}
    if n_thresholds == 1:
        out["n_2"] = None
        out["n_3"] = None
        return out
    if n:
        out["h_score"] = 100.0 * (n1 + 2 * n2 + 3 * n3) / n
        mean_pos = (n1 + 2 * n2 + 3 * n3) / n_pos if n_pos else None
        out["allred"] = allred_score(percent, mean_pos)
        out["irs"] = irs_score(percent, intensity_score(mean_pos))
    return out


def _group_summary(table, scheme: ScoringScheme, empty_table: bool, rows=None) -> dict:
    """Scores of ``table`` (of its ``rows``, a boolean mask, when given: no copy of a slide's table)."""
    nt = len(scheme.thresholds)

    def counts_for(column: str):
        if column in table.columns:
            values = table[column].to_numpy(dtype=np.float64, na_value=np.nan)
            if rows is not None:
                values = values[rows]
        elif empty_table:
            values = np.empty(0)
        else:
            return None
        return score_counts(assign_bins(values, scheme.thresholds), nt)

    head = counts_for(scheme.measurement)
    if head is None:
        raise ValueError(
            f"the cell table has no column {scheme.measurement!r} to score on; "
            f"DAB columns present: {[c for c in table.columns if 'DAB' in str(c)]}"
        )
    head["by_compartment"] = {c: counts_for(scheme.measurement_for(c)) for c in COMPARTMENTS}
    return head


def summarize(table, scheme: ScoringScheme = ScoringScheme()) -> dict:
    """Scores of a cell table for tumour cells and for all cells.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per cell with a ``class`` column (``"tumour"`` / ``"other"``)
        and QuPath-named DAB measurements (``"Nucleus: DAB OD mean"``,
        ``"Cytoplasm: DAB OD mean"``, ``"Membrane: DAB OD mean"``,
        ``"Cell: DAB OD mean"`` and the ``max`` equivalents), OD units.
    scheme : ScoringScheme

    Returns
    -------
    dict
        ``{"tumour": group, "all": group}``; each group holds the
        :func:`score_counts` fields for ``scheme.measurement`` plus
        ``"by_compartment"``: ``{compartment: counts}`` for every compartment
        with the scheme's statistic and thresholds. A compartment whose column
        is missing from a non-empty table is None; an empty table (no cells)
        gives ``n = 0`` everywhere.

    Raises
    ------
    ValueError
        When a non-empty table lacks the ``class`` column or the scheme's
        measurement column.
    """
    if len(table) and "class" not in table.columns:
        raise ValueError("the cell table has no 'class' column (tumour / other)")
    tumour = table["class"].astype(str).to_numpy() == "tumour" if len(table) else None
    empty = len(table) == 0
    return {
        "tumour": _group_summary(table, scheme, empty, rows=tumour),
        "all": _group_summary(table, scheme, empty),
    }


def headline(summary: dict, scheme: ScoringScheme) -> dict:
    """The group of a :func:`summarize` result the scheme's ``cells`` names."""
    return summary[scheme.cells]
