"""Join slide scores with clinical outcomes and test whether the score predicts response.

``ihcscore cohort`` answers one question: does the (CXCR4) H-score of a patient's
slide predict response to treatment (and, when times are given, survival)?

The core is :func:`cohort_statistics`, a plain function on two DataFrames (the
``summary.csv`` written by ``ihcscore score`` and a clinical table) that returns a
JSON-ready dict; :func:`write_cohort` writes ``cohort.json`` and a self-contained
``cohort.html``; :func:`add_cohort_arguments` / :func:`run_cohort` are the thin command
line on top (``cli.py`` mounts them as ``ihcscore cohort``; ``python -m ihcscore.cohort``
works too).

Decisions (documented in the ``--help`` text and ``cohort.json``):

- Matching: a clinical ID matches a slide when it equals the slide stem (``slide``
  column), or the first capture group (the whole match when the pattern has no group)
  of ``--id-pattern`` searched in the stem. IDs are compared as stripped strings
  (read as text, so ``007`` stays ``007``). Several slides that map to one patient
  are averaged, with a warning. A duplicated clinical ID is an error.
- Only ``summary.csv`` rows with ``status == ok`` (when a ``status`` column exists)
  and a non-null score are used; the others are listed under ``unscored``. Clinical
  rows without a usable slide are listed under ``unmatched_clinical``; slides without
  a clinical row under ``unmatched_scores``; matched patients whose response cell is
  empty under ``missing_response``. Nothing is dropped silently.
- Responses: CR/PR, 1, true, yes, y, responder, response, R, complete/partial response
  are responders; SD/PD, 0, false, no, n, non-responder, NR, stable/progressive disease
  are not (case, spaces, ``-`` and ``_`` ignored). Any other non-empty value is an
  error naming the value, the CSV line and the ID.
- Too few patients: fewer than 4 matched patients with a response is an error. When a
  response class has fewer than 2 patients, the response statistics (``auc``,
  ``auc_ci``, ``mannwhitney_p``, ``odds_ratio_*``) are null and a warning says why;
  groups, Spearman and log-rank are still reported.
- AUC: Mann–Whitney estimate (ties count 1/2); ``auc_ci`` is the percentile interval of
  a bootstrap stratified by response class (class sizes fixed), ``--seed`` fixed.
- Odds ratio: statsmodels ``Logit(response ~ 1 + score / 100)``, Wald 95 % interval,
  exponentiated. (Quasi-)complete separation, a constant score or a failed fit give
  null with a warning.
- Groups: ``< H`` and ``>= H`` with ``--cutoff H``; otherwise tertiles of the matched
  scores (``pandas.qcut``; fewer groups, with a warning, when ties merge cut points).
- Log-rank: high vs low by ``--cutoff`` (``>= H`` is high) or by the median
  (``> median`` is high), lifelines ``logrank_test``.
- Spearman: every numeric clinical column other than the ID, response, time and
  event columns, on the matched patients with both values present.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "CohortError",
    "parse_response",
    "parse_event",
    "match_cohort",
    "auc_score",
    "bootstrap_auc_ci",
    "logistic_odds_ratio",
    "response_groups",
    "logrank_high_low",
    "spearman_correlations",
    "cohort_statistics",
    "cohort_figures",
    "cohort_html",
    "format_table",
    "write_cohort",
    "simulate_cohort",
    "add_cohort_arguments",
    "run_cohort",
    "main",
]

MIN_PATIENTS = 4
MIN_PER_CLASS = 2
#: Fewer responders or non-responders than this: the AUC's bootstrap interval is flagged as unreliable.
MIN_PER_CLASS_FOR_CI = 5

_RESPONDER = {
    "cr", "pr", "1", "1.0", "true", "yes", "y", "responder", "response", "r",
    "completeresponse", "partialresponse",
}
_NON_RESPONDER = {
    "sd", "pd", "0", "0.0", "false", "no", "n", "nonresponder", "noresponse", "nr",
    "stabledisease", "progressivedisease",
}
_EVENT = {"1", "1.0", "true", "yes", "y", "event", "dead", "died", "death", "deceased",
          "progressed", "progression", "relapse", "relapsed"}
_CENSORED = {"0", "0.0", "false", "no", "n", "censored", "alive", "none"}


class CohortError(ValueError):
    """A cohort input problem, with a one-line message meant for the user."""


#: What to install when an optional dependency of the analysis is missing (plain ``pip install ihcscore``).
COHORT_EXTRA_HINT = "pip install 'ihcscore[cohort]'"


class MissingExtraError(CohortError):
    """statsmodels or lifelines (the ``[cohort]`` extra) is not installed; ``ihcscore cohort`` exits with 2."""


def _missing_extra(exc: ImportError, purpose: str) -> MissingExtraError:
    name = (exc.name or str(exc)).split(".")[0]  # the distribution to install, not the submodule
    return MissingExtraError(f"{purpose} needs {name}, which is not installed: {COHORT_EXTRA_HINT}")


def require_cohort_extra(survival: bool = False) -> None:
    """Raise :class:`MissingExtraError` unless statsmodels (and, for ``survival``, lifelines) imports."""
    try:
        import statsmodels.api  # noqa: F401
    except ImportError as exc:
        raise _missing_extra(exc, "the logistic odds ratio") from None
    if survival:
        try:
            import lifelines  # noqa: F401
        except ImportError as exc:
            raise _missing_extra(exc, "--time-column (log-rank, Kaplan-Meier)") from None


# --------------------------------------------------------------------------- parsing


def _norm_token(value) -> str:
    return re.sub(r"[\s\-_]+", "", str(value).strip().lower())


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def parse_response(values, ids=None, column="response") -> np.ndarray:
    """Map clinical response values to 1 (responder), 0 (not) or NaN (empty).

    Parameters
    ----------
    values : sequence
        Raw values of the response column (strings, numbers or booleans).
    ids : sequence, optional
        Patient IDs of the same rows, only used in error messages.
    column : str
        Column name, only used in error messages.

    Returns
    -------
    ndarray of float
        1.0 for CR/PR/1/true/yes/responder, 0.0 for SD/PD/0/false/no/non-responder,
        NaN for an empty cell.

    Raises
    ------
    CohortError
        For any other value, naming the value, the CSV line (header = line 1) and the ID.
    """
    return _parse_binary(values, _RESPONDER, _NON_RESPONDER, ids, f"response column {column!r}",
                         "CR/PR/1/true/yes/responder or SD/PD/0/false/no/non-responder")


def parse_event(values, ids=None, column="event") -> np.ndarray:
    """Map event-indicator values to 1 (event), 0 (censored) or NaN (empty).

    Accepts 1/0, true/false, yes/no, dead/alive, event/censored (case-insensitive).
    Raises :class:`CohortError` naming the value, row and ID for anything else.
    """
    return _parse_binary(values, _EVENT, _CENSORED, ids, f"event column {column!r}",
                         "1/0, true/false, yes/no, dead/alive or event/censored")


def _parse_binary(values, ones, zeros, ids, what: str, expected: str) -> np.ndarray:
    """1 for tokens in ``ones``, 0 for ``zeros``, NaN for empty cells; anything else is an error naming it."""
    values = list(values)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if _is_missing(v):
            continue
        tok = _norm_token(v)
        if tok in ones:
            out[i] = 1.0
        elif tok in zeros:
            out[i] = 0.0
        else:
            who = f" (ID {ids[i]})" if ids is not None else ""
            raise CohortError(f"unrecognised value {str(v)!r} in {what} at row {i + 2}{who}; expected {expected}")
    return out


def _parse_time(values, ids, column) -> np.ndarray:
    values = list(values)
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if _is_missing(v):
            continue
        try:
            t = float(v)
        except (TypeError, ValueError):
            t = float("nan")
        if not math.isfinite(t) or t < 0:
            raise CohortError(
                f"time column {column!r} has {str(v)!r} at row {i + 2} (ID {ids[i]}); "
                "expected a number >= 0"
            )
        out[i] = t
    return out


def _require_columns(df: pd.DataFrame, columns, what: str) -> None:
    for col in columns:
        if col is not None and col not in df.columns:
            raise CohortError(
                f"column {col!r} not found in {what}; available columns: "
                + ", ".join(map(str, df.columns))
            )


# --------------------------------------------------------------------------- matching


def match_cohort(scores_df, clinical_df, id_column, response_column, *,
                 score_column="tumour_h_score", id_pattern=None,
                 time_column=None, event_column=None):
    """Join per-slide scores with clinical rows.

    Parameters
    ----------
    scores_df : DataFrame
        ``summary.csv`` of ``ihcscore score``: a ``slide`` column (stem), optionally
        ``status``, and ``score_column``.
    clinical_df : DataFrame
        One row per patient with ``id_column`` and ``response_column`` (and optionally
        time/event and other numeric columns).
    id_column, response_column : str
        Clinical column names.
    score_column : str
        Score column of ``scores_df``.
    id_pattern : str, optional
        Regular expression searched in each slide stem; its first group (or the whole
        match) is the patient ID. Default: the stem itself.
    time_column, event_column : str, optional
        Survival columns of ``clinical_df``.

    Returns
    -------
    table : DataFrame
        One row per matched patient with a response: the clinical columns plus
        ``_id``, ``_slides`` (``;``-joined stems), ``_score``, ``_response`` (0/1) and,
        when given, ``_time`` and ``_event``.
    info : dict
        ``unmatched_scores``, ``unmatched_clinical``, ``unscored`` (list of
        ``{"slide", "reason"}``), ``missing_response`` and ``warnings``.

    Raises
    ------
    CohortError
        Missing columns, bad pattern, duplicated clinical IDs, unparseable values,
        no IDs matched.
    """
    warn: list[str] = []
    _require_columns(scores_df, ["slide", score_column], "the scores file")
    _require_columns(clinical_df, [id_column, response_column, time_column, event_column],
                     "the clinical file")
    if event_column is not None and time_column is None:
        raise CohortError("--event-column needs --time-column")

    # -- clinical side
    clin = clinical_df.copy()
    clin["_id"] = [None if _is_missing(v) else str(v).strip() for v in clin[id_column]]
    if clin["_id"].isna().any():
        rows = [str(i + 2) for i in np.flatnonzero(clin["_id"].isna().to_numpy())]
        raise CohortError(f"empty ID in column {id_column!r} at row(s) {', '.join(rows)}")
    dup = clin["_id"][clin["_id"].duplicated()].unique().tolist()
    if dup:
        raise CohortError(f"duplicated ID(s) in column {id_column!r}: {', '.join(dup[:10])}")
    ids = clin["_id"].tolist()
    clin["_response"] = parse_response(clin[response_column].tolist(), ids, response_column)
    if time_column is not None:
        clin["_time"] = _parse_time(clin[time_column].tolist(), ids, time_column)
        if event_column is not None:
            clin["_event"] = parse_event(clin[event_column].tolist(), ids, event_column)
        else:
            clin["_event"] = np.where(clin["_time"].notna(), 1.0, np.nan)
            warn.append(f"no --event-column: every time in {time_column!r} is taken as an event")

    # -- scores side
    sc = scores_df.copy()
    sc["_slide"] = [str(v).strip() for v in sc["slide"]]
    # A slide listed twice (tables of several runs concatenated) is one slide, not a patient's two:
    # its last row counts, as when ihcscore merges a folder's summary.csv.
    repeated = sc["_slide"][sc["_slide"].duplicated()].unique().tolist()
    if repeated:
        warn.append(f"{len(repeated)} slide(s) listed more than once in the scores; the last row of each is used: "
                    + ", ".join(repeated[:10]))
        sc = sc.drop_duplicates("_slide", keep="last")
    score = pd.to_numeric(sc[score_column], errors="coerce")
    usable = score.notna() & np.isfinite(score.astype(float))
    reasons = np.where(usable, "", f"no {score_column}")
    if "status" in sc.columns:
        st = sc["status"].astype(str).str.strip().str.lower()
        bad = st != "ok"
        reasons = np.where(bad, "status " + sc["status"].astype(str), reasons)
        usable &= ~bad
    unscored = [{"slide": s, "reason": str(r)} for s, r, u in
                zip(sc["_slide"], reasons, usable) if not u]
    all_ids = sc["_slide"]  # before the unscored slides are set aside: to tell "no match" from "no score"
    sc = sc.loc[usable.to_numpy()].assign(_score=score[usable].astype(float))

    try:
        rx = re.compile(id_pattern) if id_pattern else None
    except re.error as exc:
        raise CohortError(f"invalid --id-pattern {id_pattern!r}: {exc}") from None

    def derive(stem):
        """The patient ID of a slide: its stem, or the pattern's first group (None: no match)."""
        if rx is None:
            return stem
        m = rx.search(stem)
        if m is None:
            return None
        found = m.group(1) if rx.groups else m.group(0)
        return None if found is None else found.strip()  # the first group may sit out the match

    sc["_id"] = [derive(s) for s in sc["_slide"]]
    if rx is not None:
        all_ids = pd.Series([derive(s) for s in all_ids], dtype=object)
        n_nomatch = int(sc["_id"].isna().sum())
        if n_nomatch:
            warn.append(f"--id-pattern did not match {n_nomatch} slide stem(s)")

    clin_ids = set(ids)
    in_clin = sc["_id"].isin(clin_ids)
    unmatched_scores = sc.loc[~in_clin, "_slide"].tolist()
    sc = sc.loc[in_clin]
    if sc.empty and all_ids.isin(clin_ids).any():
        n_match = int(all_ids.isin(clin_ids).sum())
        raise CohortError(
            f"{n_match} slide(s) match clinical IDs but none has a {score_column} (failed slides, or a score "
            "that is null by design, e.g. no H-score with a single threshold); choose another --score-column, "
            "e.g. tumour_percent_positive"
        )
    if sc.empty:
        stems = ", ".join(scores_df["slide"].astype(str).head(3))
        cids = ", ".join(ids[:3])
        raise CohortError(
            f"no IDs matched: clinical {id_column!r} values look like {cids}; slide stems look like "
            f"{stems}" + ("" if id_pattern else "; use --id-pattern REGEX to extract the ID from the stem")
        )

    per_patient = sc.groupby("_id", sort=False).agg(
        _score=("_score", "mean"), _slides=("_slide", lambda s: ";".join(s)),
        _n_slides=("_slide", "size"))
    multi = per_patient.index[per_patient["_n_slides"] > 1].tolist()
    if multi:
        warn.append(f"{len(multi)} patient(s) have several slides; their scores are averaged: "
                    + ", ".join(multi[:10]))

    matched_ids = set(per_patient.index)
    unmatched_clinical = [i for i in ids if i not in matched_ids]
    unscored_ids = {derive(u["slide"]) for u in unscored}  # the IDs they would give, not their stems
    n_clin_unscored = sum(1 for i in unmatched_clinical if i in unscored_ids)
    if n_clin_unscored:
        warn.append(f"{n_clin_unscored} clinical ID(s) match only unscored slides")

    table = clin.merge(per_patient.reset_index(), on="_id", how="inner")
    missing = table.loc[table["_response"].isna(), "_id"].tolist()
    if missing:
        warn.append(f"{len(missing)} matched patient(s) have no response value and are left out: "
                    + ", ".join(missing[:10]))
    table = table.loc[table["_response"].notna()].reset_index(drop=True)
    table["_response"] = table["_response"].astype(int)

    info = {
        "unmatched_scores": unmatched_scores,
        "unmatched_clinical": unmatched_clinical,
        "unscored": unscored,
        "missing_response": missing,
        "warnings": warn,
    }
    return table, info


# --------------------------------------------------------------------------- statistics


def auc_score(score, response) -> float:
    """Area under the ROC curve of ``score`` for ``response`` (Mann–Whitney; ties = 1/2)."""
    from scipy.stats import rankdata

    score = np.asarray(score, float)
    y = np.asarray(response).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc_ci(score, response, n_bootstrap=2000, seed=0, level=0.95):
    """Percentile bootstrap interval for the AUC, resampling within each response class.

    Parameters
    ----------
    score, response : array_like
        Scores and 0/1 responses (both classes present).
    n_bootstrap : int
        Number of resamples; 0 returns ``(nan, nan)``.
    seed : int
        Seed of ``numpy.random.default_rng``.
    level : float
        Confidence level.

    Returns
    -------
    (lo, hi) : tuple of float
    """
    from scipy.stats import rankdata

    score = np.asarray(score, float)
    y = np.asarray(response).astype(bool)
    pos, neg = score[y], score[~y]
    n1, n0 = len(pos), len(neg)
    if n_bootstrap <= 0 or n1 == 0 or n0 == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    aucs = np.empty(n_bootstrap)
    chunk = max(1, 500_000 // (n1 + n0))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        sample = np.concatenate([pos[rng.integers(0, n1, (b, n1))],
                                 neg[rng.integers(0, n0, (b, n0))]], axis=1)
        r = rankdata(sample, axis=1)
        aucs[start:start + b] = (r[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return (float(lo), float(hi))


def logistic_odds_ratio(score, response, per=100.0):
    """Odds ratio of response per ``per`` score points from a logistic regression.

    Fits ``Logit(response ~ 1 + score / per)`` with statsmodels.

    Returns
    -------
    odds_ratio : float or None
    ci : [lo, hi] or None
        Wald 95 % interval, exponentiated.
    warning : str or None
        Why the result is null (separation, constant score, failed fit).
    """
    try:
        import statsmodels.api as sm
        from statsmodels.tools.sm_exceptions import (ConvergenceWarning, PerfectSeparationError,
                                                     PerfectSeparationWarning)
    except ImportError as exc:
        raise _missing_extra(exc, "the logistic odds ratio") from None

    x = np.asarray(score, float) / per
    y = np.asarray(response).astype(int)
    if np.ptp(x) == 0:
        return None, None, "odds ratio not estimable: the score is constant"
    pos, neg = x[y == 1], x[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None, None, "odds ratio not estimable: only one response class"
    if pos.min() >= neg.max() or neg.min() >= pos.max():
        return None, None, ("odds ratio not estimable: the score separates responders from "
                            "non-responders perfectly (infinite maximum-likelihood estimate)")
    X = sm.add_constant(x, has_constant="add")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = sm.Logit(y, X).fit(disp=0, maxiter=200)
        except (PerfectSeparationError, np.linalg.LinAlgError) as exc:
            return None, None, f"odds ratio not estimable: {exc}"
    kinds = {type(w.message) for w in caught}
    if PerfectSeparationWarning in kinds:
        return None, None, "odds ratio not estimable: perfect separation"
    if ConvergenceWarning in kinds or not res.mle_retvals.get("converged", True):
        return None, None, "odds ratio not estimable: logistic regression did not converge"
    beta = float(res.params[1])
    lo, hi = (float(v) for v in np.asarray(res.conf_int())[1])
    vals = [math.exp(beta), math.exp(lo), math.exp(hi)] if max(abs(beta), abs(lo), abs(hi)) < 700 \
        else [float("inf")] * 3
    if not all(math.isfinite(v) for v in vals):
        return None, None, "odds ratio not estimable: non-finite estimate"
    return vals[0], [vals[1], vals[2]], None


def response_groups(score, response, cutoff=None):
    """Response rate by score group.

    Parameters
    ----------
    score, response : array_like
    cutoff : float, optional
        Two groups ``< cutoff`` and ``>= cutoff``; default tertiles of ``score``.

    Returns
    -------
    groups : list of dict
        ``{"group", "n", "responders", "response_rate"}`` (rate null when n == 0).
    labels : ndarray of int
        Group index of every patient.
    warning : str or None
    """
    score = np.asarray(score, float)
    y = np.asarray(response).astype(int)
    warning = None
    if cutoff is not None:
        labels = (score >= cutoff).astype(int)
        names = [f"< {cutoff:g}", f">= {cutoff:g}"]
    else:
        if np.unique(score).size < 2:  # qcut has no bin edges to cut one value with (its codes are NaN)
            labels = np.zeros(score.size, int)
        else:
            labels = np.asarray(pd.qcut(score, 3, labels=False, duplicates="drop"), int)
            # a bin can come out empty (few patients, a quantile landing on a score): groups are the bins
            # that hold patients, numbered in order
            labels = np.unique(labels, return_inverse=True)[1].reshape(-1)
        k = int(labels.max()) + 1 if labels.size else 0
        if k < 3:
            warning = f"tertile cut points coincide (tied or few scores): {k} group(s) instead of 3"
        names = []
        for g in range(k):
            s = score[labels == g]
            names.append(f"T{g + 1} ({s.min():.1f}–{s.max():.1f})")
    groups = []
    for g, name in enumerate(names):
        sel = labels == g
        n = int(sel.sum())
        r = int(y[sel].sum())
        groups.append({"group": name, "n": n, "responders": r,
                       "response_rate": (r / n) if n else None})
    return groups, labels, warning


def logrank_high_low(score, time, event, cutoff=None):
    """Log-rank test of high vs low score.

    High is ``score >= cutoff`` when a cut-off is given, else ``score > median``.

    Returns
    -------
    p : float or None
    high : ndarray of bool
    summary : dict
        ``split`` (text), ``threshold`` and per group ``n``, ``events``, ``median_time``.
    warning : str or None
    """
    try:
        from lifelines import KaplanMeierFitter
        from lifelines.statistics import logrank_test
    except ImportError as exc:
        raise _missing_extra(exc, "the log-rank test") from None

    score = np.asarray(score, float)
    time = np.asarray(time, float)
    event = np.asarray(event, float)
    if cutoff is not None:
        thr, high, split = float(cutoff), score >= cutoff, f">= {cutoff:g} vs < {cutoff:g}"
    else:
        thr = float(np.median(score))
        high, split = score > thr, f"> median ({thr:.1f}) vs <= median"
    summary = {"split": split, "threshold": thr, "groups": []}
    for name, sel in (("low", ~high), ("high", high)):
        n = int(sel.sum())
        med = None
        if n:
            kmf = KaplanMeierFitter().fit(time[sel], event[sel])
            m = float(kmf.median_survival_time_)
            med = m if math.isfinite(m) else None
        summary["groups"].append({"group": name, "n": n, "events": int(event[sel].sum()),
                                  "median_time": med})
    if high.sum() == 0 or (~high).sum() == 0:
        return None, high, summary, "log-rank not computed: one score group is empty"
    if event.sum() == 0:
        return None, high, summary, "log-rank not computed: no events"
    res = logrank_test(time[high], time[~high], event_observed_A=event[high],
                       event_observed_B=event[~high])
    return float(res.p_value), high, summary, None


def spearman_correlations(table, columns, score_column="_score"):
    """Spearman rho and p of the score against each column (pairs with both values).

    Returns
    -------
    result : dict
        ``{column: {"rho", "p", "n"}}``; rho and p null with fewer than 3 pairs or a
        constant column.
    warnings : list of str
    """
    from scipy.stats import spearmanr

    out, warn = {}, []
    for col in columns:
        pair = table[[score_column, col]].apply(pd.to_numeric, errors="coerce").dropna()
        n = len(pair)
        if n < 3 or pair[col].nunique() < 2 or pair[score_column].nunique() < 2:
            out[str(col)] = {"rho": None, "p": None, "n": n}
            warn.append(f"Spearman for {col!r} not computed ({n} pairs or a constant column)")
            continue
        rho, p = spearmanr(pair[score_column], pair[col])
        out[str(col)] = {"rho": float(rho), "p": float(p), "n": n}
    return out, warn


def _extra_numeric_columns(clinical_df, exclude):
    """The clinical columns to correlate with the score, and warnings.

    A column of numbers with a few text cells ("unknown", "n/a") counts, its text cells left out and
    said so; a column mostly of text (sex, site) does not.
    """
    cols, warn = [], []
    for c in clinical_df.columns:
        if c in exclude or str(c).startswith("_"):
            continue
        s = clinical_df[c]
        if pd.api.types.is_bool_dtype(s):
            continue
        if not pd.api.types.is_numeric_dtype(s):
            given = s[s.notna() & (s.astype(str).str.strip() != "")]
            numbers = pd.to_numeric(given, errors="coerce")
            if given.empty or numbers.notna().sum() <= len(given) / 2:
                continue
            text = given[numbers.isna()].astype(str).unique().tolist()
            warn.append(f"clinical column {c!r}: {int(numbers.isna().sum())} non-numeric value(s) left out of "
                        f"its Spearman correlation ({', '.join(repr(t) for t in text[:3])})")
        cols.append(c)
    return cols, warn


def cohort_statistics(scores_df, clinical_df, id_column, response_column, *,
                      time_column=None, event_column=None, id_pattern=None,
                      score_column="tumour_h_score", cutoff=None, n_bootstrap=2000,
                      seed=0, return_table=False):
    """Association of a slide score with clinical response (and survival).

    Parameters
    ----------
    scores_df : DataFrame
        ``summary.csv`` from ``ihcscore score`` (``slide``, ``status``, score columns).
    clinical_df : DataFrame
        One row per patient.
    id_column, response_column : str
        Clinical ID and response columns.
    time_column, event_column : str, optional
        Survival time and event indicator; enable ``logrank_p``.
    id_pattern : str, optional
        Regex whose first group, searched in the slide stem, is the patient ID.
    score_column : str
        Score column of ``scores_df`` (default ``tumour_h_score``).
    cutoff : float, optional
        Score cut-off for the groups and the log-rank split; default tertiles / median.
    n_bootstrap : int
        Bootstrap resamples for ``auc_ci`` (0: no interval).
    seed : int
        Random seed of the bootstrap.
    return_table : bool
        Also return the matched per-patient table (for plots).

    Returns
    -------
    result : dict
        JSON-ready: ``n_matched``, ``unmatched_scores``, ``unmatched_clinical``,
        ``n_responders``, ``auc``, ``auc_ci``, ``mannwhitney_p``, ``odds_ratio_per_100``,
        ``odds_ratio_ci``, ``odds_ratio_per_point`` (and ``_ci``), ``groups``, ``logrank_p``, ``spearman`` and also
        ``score_column``, ``n_unscored``, ``unscored``, ``missing_response``,
        ``cutoff``, ``grouping``, ``survival``, ``n_bootstrap``, ``seed``, ``warnings``.
    table : DataFrame
        Only with ``return_table=True``.

    Raises
    ------
    CohortError
        Input problems, no IDs matched, or fewer than 4 matched patients; its subclass
        :class:`MissingExtraError` when statsmodels or lifelines (the ``[cohort]`` extra) is missing.
    """
    from scipy.stats import mannwhitneyu

    table, info = match_cohort(scores_df, clinical_df, id_column, response_column,
                               score_column=score_column, id_pattern=id_pattern,
                               time_column=time_column, event_column=event_column)
    warn = list(info["warnings"])
    n = len(table)
    if n < MIN_PATIENTS:
        raise CohortError(f"too few patients: {n} matched with a response (need at least {MIN_PATIENTS})")
    score = table["_score"].to_numpy(float)
    y = table["_response"].to_numpy(int)
    n1, n0 = int(y.sum()), int(n - y.sum())

    auc = auc_ci = mw_p = orr = or_ci = or_point = or_point_ci = None
    if min(n1, n0) < MIN_PER_CLASS:
        warn.append(f"response statistics not computed: {n1} responder(s) and {n0} non-responder(s) "
                    f"(need at least {MIN_PER_CLASS} of each)")
    else:
        auc = auc_score(score, y)
        mw_p = float(mannwhitneyu(score[y == 1], score[y == 0], alternative="two-sided").pvalue)
        if n_bootstrap > 0:
            auc_ci = list(bootstrap_auc_ci(score, y, n_bootstrap, seed))
            if auc_ci[0] == auc_ci[1] or min(n1, n0) < MIN_PER_CLASS_FOR_CI:
                warn.append(f"the AUC's bootstrap interval {_fmt_ci(auc_ci)} is not reliable with {n1} responder(s) "
                            f"and {n0} non-responder(s) (resamples repeat the same few patients); "
                            f"Mann–Whitney p = {_fmt(mw_p)}")
        orr, or_ci, w = logistic_odds_ratio(score, y, per=100.0)
        if w:
            warn.append(w)
        if orr is not None:  # per point: Wald intervals are linear in the log odds
            or_point, or_point_ci = orr ** 0.01, [v ** 0.01 for v in or_ci]
        if orr is not None and "h_score" not in score_column:
            lo, hi = float(np.min(score)), float(np.max(score))
            warn.append(f"odds_ratio_per_100 is per 100 points of {score_column} (scores {lo:g}–{hi:g}), not of an "
                        f"H-score; per point it is {_fmt(or_point)} {_fmt_ci(or_point_ci)}")

    groups, labels, w = response_groups(score, y, cutoff)
    if w:
        warn.append(w)
    table["_group"] = [groups[g]["group"] for g in labels]

    logrank_p, survival = None, None
    if time_column is not None:
        ok = table["_time"].notna() & table["_event"].notna()
        if (~ok).any():
            warn.append(f"{int((~ok).sum())} patient(s) without time/event are left out of the log-rank test")
        if ok.sum() >= 2:
            sub = table.loc[ok]
            logrank_p, high, survival, w = logrank_high_low(
                sub["_score"], sub["_time"], sub["_event"], cutoff)
            table["_high"] = pd.Series(high, index=sub.index).reindex(table.index)
            survival["time_column"] = time_column
            if w:
                warn.append(w)
        else:
            warn.append("log-rank not computed: fewer than 2 patients with time and event")

    extra, w = _extra_numeric_columns(clinical_df, {id_column, response_column, time_column, event_column})
    warn.extend(w)
    spearman, w = spearman_correlations(table, extra)
    warn.extend(w)

    result = {
        "score_column": score_column,
        "n_matched": n,
        "unmatched_scores": info["unmatched_scores"],
        "unmatched_clinical": info["unmatched_clinical"],
        "n_unscored": len(info["unscored"]),
        "unscored": info["unscored"],
        "missing_response": info["missing_response"],
        "n_responders": n1,
        "auc": auc,
        "auc_ci": auc_ci,
        "mannwhitney_p": mw_p,
        "odds_ratio_per_100": orr,
        "odds_ratio_ci": or_ci,
        "odds_ratio_per_point": or_point,
        "odds_ratio_per_point_ci": or_point_ci,
        "cutoff": None if cutoff is None else float(cutoff),
        "grouping": "cutoff" if cutoff is not None else "tertiles",
        "groups": groups,
        "logrank_p": logrank_p,
        "survival": survival,
        "spearman": spearman,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "warnings": warn,
    }
    result = _jsonable(result)
    return (result, table) if return_table else result


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------- output


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def _fmt_ci(ci, digits=3):
    return "—" if not ci else f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]"


def _summary_rows(result):
    rows = [
        ("score column", result["score_column"]),
        ("patients matched", result["n_matched"]),
        ("responders", result["n_responders"]),
        ("slides without a clinical row", len(result["unmatched_scores"])),
        ("clinical rows without a scored slide", len(result["unmatched_clinical"])),
        ("unscored slides", result["n_unscored"]),
        ("AUC", _fmt(result["auc"])),
        ("AUC 95% CI (bootstrap)", _fmt_ci(result["auc_ci"])),
        ("Mann–Whitney p", _fmt(result["mannwhitney_p"])),
        ("odds ratio per 100 points", _fmt(result["odds_ratio_per_100"])),
        ("odds ratio 95% CI", _fmt_ci(result["odds_ratio_ci"])),
        ("odds ratio per point", _fmt(result.get("odds_ratio_per_point"))),
        ("odds ratio per point 95% CI", _fmt_ci(result.get("odds_ratio_per_point_ci"))),
        ("log-rank p" + (f" ({result['survival']['split']})" if result.get("survival") else ""),
         _fmt(result["logrank_p"])),
    ]
    return [(k, str(v)) for k, v in rows]


def format_table(result) -> str:
    """The headline numbers, groups and Spearman correlations as a plain aligned table."""
    lines = []
    rows = _summary_rows(result)
    w = max(len(k) for k, _ in rows)
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("")
    g = result["groups"]
    gw = max([len("group")] + [len(x["group"]) for x in g])
    lines.append(f"{'group':<{gw}}  {'n':>4}  {'resp':>4}  {'rate':>6}")
    for x in g:
        rate = "—" if x["response_rate"] is None else f"{100 * x['response_rate']:.0f}%"
        lines.append(f"{x['group']:<{gw}}  {x['n']:>4}  {x['responders']:>4}  {rate:>6}")
    if result["spearman"]:
        lines.append("")
        cw = max([len("Spearman vs score")] + [len(c) for c in result["spearman"]])
        lines.append(f"{'Spearman vs score':<{cw}}  {'rho':>7}  {'p':>9}  {'n':>4}")
        for c, s in result["spearman"].items():
            lines.append(f"{c:<{cw}}  {_fmt(s['rho']):>7}  {_fmt(s['p']):>9}  {s['n']:>4}")
    for wmsg in result["warnings"]:
        lines.append(f"warning: {wmsg}")
    return "\n".join(lines)


def cohort_figures(result, table) -> dict:
    """Matplotlib figures (Agg) of a cohort analysis.

    Returns
    -------
    dict
        ``{"box", "roc", "groups"}``, ``"km"`` with survival data and
        ``"spearman:<column>"`` per computed correlation; values are Figures.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    label = result["score_column"]
    score = table["_score"].to_numpy(float)
    y = table["_response"].to_numpy(int)
    figs = {}

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    data = [score[y == 0], score[y == 1]]
    ax.boxplot(data, widths=0.5, showfliers=False)
    ax.set_xticks([1, 2], [f"non-responder\n(n={len(data[0])})", f"responder\n(n={len(data[1])})"])
    jit = np.random.default_rng(0)
    for i, d in enumerate(data):
        ax.scatter(i + 1 + jit.uniform(-0.15, 0.15, len(d)), d, s=12, alpha=0.6,
                   color=("tab:blue", "tab:red")[i], zorder=3)
    ax.set_ylabel(label)
    ax.set_title(f"Score by response (Mann–Whitney p = {_fmt(result['mannwhitney_p'])})", fontsize=9)
    fig.tight_layout()
    figs["box"] = fig

    fig, ax = plt.subplots(figsize=(3.8, 3.6))
    if result["auc"] is not None:
        from sklearn.metrics import roc_curve
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, color="tab:red", lw=2)
        txt = f"AUC = {result['auc']:.3f}"
        if result["auc_ci"]:
            txt += f"\n95% CI {result['auc_ci'][0]:.3f}–{result['auc_ci'][1]:.3f}"
        ax.text(0.97, 0.05, txt, ha="right", va="bottom", transform=ax.transAxes)
    else:
        ax.text(0.5, 0.5, "AUC not computed", ha="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC: {label} for response", fontsize=9)
    ax.set_aspect("equal")
    fig.tight_layout()
    figs["roc"] = fig

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    g = result["groups"]
    rates = [100 * (x["response_rate"] or 0) for x in g]
    bars = ax.bar(range(len(g)), rates, color="tab:purple", alpha=0.8)
    for b, x in zip(bars, g):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{x['responders']}/{x['n']}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(g)), [x["group"] for x in g], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("response rate (%)")
    ax.set_title(f"Response by {result['grouping']}", fontsize=9)
    fig.tight_layout()
    figs["groups"] = fig

    if result.get("survival") and "_high" in table:
        try:
            from lifelines import KaplanMeierFitter
        except ImportError as exc:
            raise _missing_extra(exc, "the Kaplan-Meier plot") from None
        sub = table.loc[table["_high"].notna()]
        high = sub["_high"].astype(bool).to_numpy()
        fig, ax = plt.subplots(figsize=(4.6, 3.6))
        for name, sel, col in (("low", ~high, "tab:blue"), ("high", high, "tab:red")):
            if sel.sum():
                KaplanMeierFitter().fit(sub["_time"][sel], sub["_event"][sel],
                                        label=f"{name} (n={int(sel.sum())})").plot_survival_function(
                    ax=ax, ci_show=False, color=col, show_censors=True)
        ax.set_xlabel(result["survival"].get("time_column", "time"))
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Kaplan–Meier, {result['survival']['split']}\nlog-rank p = "
                     f"{_fmt(result['logrank_p'])}", fontsize=9)
        fig.tight_layout()
        figs["km"] = fig

    for col, s in result["spearman"].items():
        if s["rho"] is None:
            continue
        pair = table[["_score", col]].apply(pd.to_numeric, errors="coerce").dropna()
        fig, ax = plt.subplots(figsize=(3.8, 3.4))
        ax.scatter(pair["_score"], pair[col], s=12, alpha=0.7)
        ax.set_xlabel(label)
        ax.set_ylabel(col)
        ax.set_title(f"Spearman rho = {s['rho']:.3f}, p = {_fmt(s['p'])}", fontsize=9)
        fig.tight_layout()
        figs[f"spearman:{col}"] = fig
    return figs


def _png_base64(fig, dpi=90) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CAPTIONS = {"box": "Score by response", "roc": "ROC curve", "groups": "Response rate by group",
             "km": "Kaplan–Meier curves"}


def cohort_html(result, table) -> str:
    """A self-contained HTML page (inline CSS, base64 PNG plots) of the analysis."""
    import matplotlib.pyplot as plt

    e = html.escape
    figs = cohort_figures(result, table)
    imgs = []
    for key, fig in figs.items():
        cap = _CAPTIONS.get(key, f"Spearman: {key.split(':', 1)[-1]}")
        imgs.append(f'<figure id="fig-{e(key.replace(":", "-"))}"><img alt="{e(cap)}" '
                    f'src="data:image/png;base64,{_png_base64(fig)}"><figcaption>{e(cap)}</figcaption></figure>')
        plt.close(fig)
    summary = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _summary_rows(result))
    groups = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            e(g["group"]), g["n"], g["responders"],
            "—" if g["response_rate"] is None else f"{100 * g['response_rate']:.0f}%")
        for g in result["groups"])
    spear = "".join(
        f"<tr><td>{e(c)}</td><td>{_fmt(s['rho'])}</td><td>{_fmt(s['p'])}</td><td>{s['n']}</td></tr>"
        for c, s in result["spearman"].items())
    lists = []
    for key, title in (("unmatched_scores", "Slides without a clinical row"),
                       ("unmatched_clinical", "Clinical IDs without a scored slide"),
                       ("missing_response", "Matched patients without a response")):
        if result[key]:
            lists.append(f"<h3>{e(title)} ({len(result[key])})</h3><p>{e(', '.join(result[key]))}</p>")
    if result["unscored"]:
        lists.append(f"<h3>Unscored slides ({len(result['unscored'])})</h3><p>"
                     + e(", ".join(f"{u['slide']} ({u['reason']})" for u in result["unscored"])) + "</p>")
    warn = "".join(f"<li>{e(w)}</li>" for w in result["warnings"])
    from . import __version__
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ihcscore cohort: {e(result['score_column'])} vs response</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}}
table{{border-collapse:collapse;margin:0.5em 0 1em}} th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
th{{background:#f3f3f3}} figure{{display:inline-block;margin:0.5em;vertical-align:top}}
figcaption{{font-size:0.85em;color:#555;text-align:center}} .warn{{color:#a60}}
</style></head><body>
<h1>Does {e(result['score_column'])} predict response?</h1>
<table id="summary">{summary}</table>
<h2>Response by group ({e(result['grouping'])})</h2>
<table id="groups"><tr><th>group</th><th>n</th><th>responders</th><th>response rate</th></tr>{groups}</table>
{('<h2>Spearman correlation with the score</h2><table id="spearman"><tr><th>column</th><th>rho</th><th>p</th><th>n</th></tr>' + spear + '</table>') if spear else ''}
<h2>Plots</h2>
{''.join(imgs)}
{('<h2>Warnings</h2><ul class="warn">' + warn + '</ul>') if warn else ''}
{''.join(lists)}
<p style="font-size:0.8em;color:#777">ihcscore {e(__version__)}; bootstrap {result['n_bootstrap']} resamples, seed {result['seed']}.</p>
</body></html>
"""


def _write_text(path, text: str) -> None:
    from .atomic import atomic_open

    with atomic_open(path, "w") as f:
        f.write(text)


def write_cohort(result, table, out_dir, html_report=True) -> dict:
    """Write ``cohort.json`` (and ``cohort.html``) atomically into ``out_dir``.

    Returns
    -------
    dict
        ``{"json": Path, "html": Path or None}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "cohort.json", "html": None}
    _write_text(paths["json"], json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if html_report:
        paths["html"] = out_dir / "cohort.html"
        _write_text(paths["html"], cohort_html(result, table))
    return paths


# --------------------------------------------------------------------------- simulation


def simulate_cohort(n=120, odds_ratio_per_100=3.0, base_rate=0.35, seed=0, survival=False,
                    hazard_ratio_high=3.0):
    """A synthetic cohort with a known effect, for demos and tests.

    Scores are ``U(0, 300)``; response is Bernoulli with
    ``logit p = logit(base_rate) + log(odds_ratio_per_100) * (score - 150) / 100``.
    With ``survival=True`` exponential times whose hazard is ``hazard_ratio_high`` times
    higher above the median score, with uniform censoring.

    Returns
    -------
    scores : DataFrame
        ``slide`` (``S001``...), ``status``, ``tumour_h_score``.
    clinical : DataFrame
        ``patient_id``, ``response`` (CR/PR/SD/PD) and, with survival, ``time_months``,
        ``event``.
    """
    rng = np.random.default_rng(seed)
    h = rng.uniform(0, 300, n)
    eta = math.log(base_rate / (1 - base_rate)) + math.log(odds_ratio_per_100) * (h - 150) / 100
    resp = rng.random(n) < 1 / (1 + np.exp(-eta))
    ids = [f"S{i + 1:03d}" for i in range(n)]
    labels = np.where(resp, rng.choice(["CR", "PR"], n), rng.choice(["SD", "PD"], n))
    scores = pd.DataFrame({"slide": ids, "status": "ok", "tumour_h_score": h})
    clinical = pd.DataFrame({"patient_id": ids, "response": labels})
    if survival:
        hazard = np.where(h > np.median(h), hazard_ratio_high, 1.0) / 24.0
        t = rng.exponential(1 / hazard)
        c = rng.uniform(12, 60, n)
        clinical["time_months"] = np.round(np.minimum(t, c), 2)
        clinical["event"] = (t <= c).astype(int)
    return scores, clinical


# --------------------------------------------------------------------------- CLI


def add_cohort_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``ihcscore cohort`` flags to ``parser``."""
    parser.add_argument("--scores", required=True, metavar="SUMMARY.csv",
                        help="summary.csv written by `ihcscore score` (one row per slide: slide name, status, scores)")
    parser.add_argument("--clinical", required=True, metavar="CLINICAL.csv",
                        help="clinical table, one row per patient (CSV)")
    parser.add_argument("--id-column", required=True, metavar="COL",
                        help="clinical column holding the patient/slide ID (matched to summary.csv's slide: the slide "
                             "stem, or its output folder name when stems collide, e.g. a_x)")
    parser.add_argument("--response-column", required=True, metavar="COL",
                        help="clinical response column: CR/PR/1/true/yes/responder = responder, "
                             "SD/PD/0/false/no/non-responder = not; empty cells are left out (listed)")
    parser.add_argument("--time-column", metavar="COL",
                        help="clinical survival/follow-up time column (any time unit, >= 0); enables the log-rank test")
    parser.add_argument("--event-column", metavar="COL",
                        help="clinical event column (1/0, true/false, dead/alive); without it every time is an event")
    parser.add_argument("--id-pattern", metavar="REGEX",
                        help="regular expression searched in each slide stem; its first group (or the whole match) "
                             "is the patient ID, e.g. '^(P\\d+)_' (default: the whole stem)")
    parser.add_argument("--score-column", default="tumour_h_score", metavar="COL",
                        help="score column of summary.csv (default: tumour_h_score, H-score 0–300)")
    parser.add_argument("--cutoff", type=float, metavar="H",
                        help="score cut-off (score units, e.g. H-score points): groups < H and >= H and the "
                             "log-rank split (default: tertiles for groups, median for log-rank)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N",
                        help="bootstrap resamples for the AUC 95%% CI, stratified by response (default: 2000; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap (default: 0)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder for cohort.json and cohort.html (default: the folder of --scores)")
    parser.add_argument("--no-html", action="store_true", help="write cohort.json only")
    return parser


def _read_csv(path, what):
    p = Path(path)
    if not p.is_file():
        raise CohortError(f"{what} file not found: {p}")
    try:
        return pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CohortError(f"cannot read {what} file {p}: {str(exc).splitlines()[0]}") from None


def run_cohort(args) -> int:
    """Run ``ihcscore cohort`` from parsed arguments; returns the exit code (0 ok, 1 input error,
    2 the ``[cohort]`` extra not installed)."""
    try:
        require_cohort_extra(survival=args.time_column is not None)  # before reading anything
        if args.bootstrap < 0:
            raise CohortError("--bootstrap must be >= 0")
        scores = _read_csv(args.scores, "scores")
        clinical = _read_csv(args.clinical, "clinical")
        if args.id_column in clinical.columns:  # keep IDs as text (leading zeros)
            clinical = pd.read_csv(args.clinical, dtype={args.id_column: str})
        if "slide" in scores.columns:
            scores = pd.read_csv(args.scores, dtype={"slide": str})
        result, table = cohort_statistics(
            scores, clinical, args.id_column, args.response_column,
            time_column=args.time_column, event_column=args.event_column,
            id_pattern=args.id_pattern, score_column=args.score_column, cutoff=args.cutoff,
            n_bootstrap=args.bootstrap, seed=args.seed, return_table=True)
        out_dir = Path(args.out) if args.out else Path(args.scores).resolve().parent
        try:
            paths = write_cohort(result, table, out_dir, html_report=not getattr(args, "no_html", False))
        except OSError as exc:
            raise CohortError(f"--out {out_dir}: cannot write the results ({exc.strerror or exc})") from exc
    except CohortError as exc:
        print(f"ihcscore cohort: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, MissingExtraError) else 1
    print(format_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None))
    return 0


def main(argv=None) -> int:
    """``python -m ihcscore.cohort ...``: parse ``argv`` and run; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="ihcscore cohort",
        description="Join slide scores with clinical outcomes: does the score predict response?")
    add_cohort_arguments(parser)
    return run_cohort(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
