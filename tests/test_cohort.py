"""Tests of ihcscore.cohort: statistics on simulated cohorts with known truth, matching, errors, CLI."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest

from ihcscore.cli import main as cli_main
from ihcscore.cohort import (CohortError, MissingExtraError, auc_score, bootstrap_auc_ci, cohort_statistics,
                             format_table, main, parse_event, parse_response, simulate_cohort)

CONTRACT_KEYS = {"n_matched", "unmatched_scores", "unmatched_clinical", "n_responders", "auc",
                 "auc_ci", "mannwhitney_p", "odds_ratio_per_100", "odds_ratio_ci", "groups",
                 "logrank_p", "spearman"}


def make_cohort(n=120, true_or=3.0, seed=0, base_rate=0.4):
    """Scores U(0, 300); logit P(response) = a + log(true_or) * (H - 150) / 100."""
    rng = np.random.default_rng(seed)
    h = rng.uniform(0, 300, n)
    eta = math.log(base_rate / (1 - base_rate)) + math.log(true_or) * (h - 150) / 100
    resp = rng.random(n) < 1 / (1 + np.exp(-eta))
    ids = [f"P{i:03d}" for i in range(n)]
    scores = pd.DataFrame({"slide": ids, "status": "ok", "n_cells": 1000, "tumour_h_score": h,
                           "all_h_score": h * 0.8})
    clinical = pd.DataFrame({"pid": ids, "best_response": np.where(resp, "PR", "PD")})
    return scores, clinical


# ----------------------------------------------------------------------------- statistics


def test_true_effect_is_detected():
    scores, clinical = make_cohort(120, true_or=3.0, seed=0)
    r = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=2000, seed=0)
    assert CONTRACT_KEYS <= set(r)
    assert r["n_matched"] == 120
    assert r["n_responders"] == int((clinical.best_response == "PR").sum())
    assert r["auc"] > 0.65
    lo, hi = r["auc_ci"]
    assert lo < r["auc"] < hi and lo > 0.5
    assert r["mannwhitney_p"] < 0.01
    assert r["odds_ratio_ci"][0] < 3.0 < r["odds_ratio_ci"][1]
    assert r["odds_ratio_ci"][0] > 1.0
    assert r["logrank_p"] is None and r["survival"] is None
    # tertiles: 3 groups covering everyone, response rate rising with the score
    assert [g["n"] for g in r["groups"]] == [40, 40, 40]
    assert sum(g["responders"] for g in r["groups"]) == r["n_responders"]
    rates = [g["response_rate"] for g in r["groups"]]
    assert rates[0] < rates[2]
    assert set(r["groups"][0]) == {"group", "n", "responders", "response_rate"}
    json.dumps(r, allow_nan=False)  # strictly JSON


def test_null_cohort_is_not_significant():
    scores, clinical = make_cohort(120, true_or=1.0, seed=3)
    r = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=2000, seed=0)
    assert r["auc_ci"][0] < 0.5 < r["auc_ci"][1]
    assert r["mannwhitney_p"] > 0.05
    assert r["odds_ratio_ci"][0] < 1.0 < r["odds_ratio_ci"][1]


def test_auc_matches_sklearn_and_bootstrap_is_seeded():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    s = np.round(rng.uniform(0, 300, 60), -1)  # ties
    y = rng.random(60) < 0.5
    assert auc_score(s, y) == pytest.approx(roc_auc_score(y, s))
    a = bootstrap_auc_ci(s, y, 500, seed=7)
    assert a == bootstrap_auc_ci(s, y, 500, seed=7)
    assert a != bootstrap_auc_ci(s, y, 500, seed=8)


def test_survival_logrank_detects_hazard_difference():
    rng = np.random.default_rng(5)
    n = 120
    scores, clinical = make_cohort(n, true_or=1.0, seed=5)
    h = scores.tumour_h_score.to_numpy()
    hazard = np.where(h > np.median(h), 3.0, 1.0) / 24.0  # high scores: 3x hazard
    t = rng.exponential(1 / hazard)
    c = rng.uniform(12, 60, n)
    clinical["os_months"] = np.minimum(t, c)
    clinical["death"] = np.where(t <= c, "dead", "alive")
    r = cohort_statistics(scores, clinical, "pid", "best_response", time_column="os_months",
                          event_column="death", n_bootstrap=0)
    assert r["logrank_p"] < 0.05
    assert r["auc_ci"] is None  # --bootstrap 0
    low, high = r["survival"]["groups"]
    assert low["n"] + high["n"] == n and low["n"] == high["n"]
    assert high["events"] > low["events"]
    assert high["median_time"] < low["median_time"]
    # time and event are not Spearman columns
    assert r["spearman"] == {}

    # same with a cut-off: groups and split follow it
    r2 = cohort_statistics(scores, clinical, "pid", "best_response", time_column="os_months",
                           event_column="death", n_bootstrap=0, cutoff=150)
    assert [g["group"] for g in r2["groups"]] == ["< 150", ">= 150"]
    assert r2["groups"][1]["n"] == int((h >= 150).sum())
    assert r2["survival"]["groups"][1]["n"] == int((h >= 150).sum())
    assert r2["logrank_p"] < 0.05


def test_spearman_recovers_known_rho():
    # score = 300 * Phi(z1) is monotone in z1; flow = r z1 + sqrt(1 - r^2) z2 is bivariate
    # normal with z1, so Spearman rho = (6 / pi) asin(r / 2).
    from scipy.stats import norm

    n, r_true = 300, 0.7
    rho_true = 6 / math.pi * math.asin(r_true / 2)
    rng = np.random.default_rng(11)
    z1, z2 = rng.standard_normal((2, n))
    scores, clinical = make_cohort(n, true_or=2.0, seed=11)
    scores["tumour_h_score"] = 300 * norm.cdf(z1)
    clinical["flow_pct_cxcr4"] = r_true * z1 + math.sqrt(1 - r_true**2) * z2
    clinical["ddct"] = -(r_true * z1 + math.sqrt(1 - r_true**2) * z2) + 5  # negative association
    clinical["noise"] = rng.standard_normal(n)
    clinical.loc[:9, "noise"] = np.nan  # missing values are skipped pairwise
    clinical["site"] = "A"  # not numeric: ignored
    r = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=0)
    assert set(r["spearman"]) == {"flow_pct_cxcr4", "ddct", "noise"}
    assert r["spearman"]["flow_pct_cxcr4"]["rho"] == pytest.approx(rho_true, abs=0.08)
    assert r["spearman"]["ddct"]["rho"] == pytest.approx(-rho_true, abs=0.08)
    assert r["spearman"]["flow_pct_cxcr4"]["p"] < 1e-10
    assert r["spearman"]["noise"]["n"] == n - 10
    assert abs(r["spearman"]["noise"]["rho"]) < 0.2


def test_perfect_separation_gives_null_odds_ratio_with_warning():
    h = np.linspace(0, 300, 20)
    scores = pd.DataFrame({"slide": [f"s{i}" for i in range(20)], "tumour_h_score": h})
    clinical = pd.DataFrame({"id": scores.slide, "resp": np.where(h > 150, "CR", "SD")})
    r = cohort_statistics(scores, clinical, "id", "resp", n_bootstrap=200)
    assert r["auc"] == 1.0
    assert r["odds_ratio_per_100"] is None and r["odds_ratio_ci"] is None
    assert any("separat" in w for w in r["warnings"])


def test_one_class_too_small_gives_null_stats_and_too_few_patients_errors():
    scores, clinical = make_cohort(10, seed=0)
    clinical["best_response"] = ["PR"] + ["PD"] * 9
    r = cohort_statistics(scores, clinical, "pid", "best_response")
    assert r["auc"] is None and r["auc_ci"] is None and r["mannwhitney_p"] is None
    assert r["odds_ratio_per_100"] is None
    assert any("1 responder" in w for w in r["warnings"])
    assert sum(g["n"] for g in r["groups"]) == 10
    with pytest.raises(CohortError, match="too few patients: 3"):
        cohort_statistics(scores.iloc[:3], clinical, "pid", "best_response")


def test_constant_scores_give_one_group_and_null_statistics():
    # every matched H-score 0 (e.g. a CXCR4-negative cohort): no tertiles to cut, no ranking to test
    ids = [f"P{i}" for i in range(6)]
    scores = pd.DataFrame({"slide": ids, "status": "ok", "tumour_h_score": 0.0})
    clinical = pd.DataFrame({"pid": ids, "resp": ["CR", "PD", "PR", "SD", "PD", "CR"]})
    r = cohort_statistics(scores, clinical, "pid", "resp", n_bootstrap=50)
    assert [g["n"] for g in r["groups"]] == [6] and r["groups"][0]["responders"] == 3
    assert r["auc"] == 0.5  # all pairs tied
    assert r["odds_ratio_per_100"] is None
    assert any("1 group(s) instead of 3" in w for w in r["warnings"])


# ----------------------------------------------------------------------------- matching


def test_unmatched_unscored_and_missing_response_are_listed():
    scores, clinical = make_cohort(30, seed=2)
    scores = pd.concat([scores, pd.DataFrame({"slide": ["EXTRA1", "EXTRA2"], "status": "ok",
                                              "tumour_h_score": [10.0, 20.0]})], ignore_index=True)
    scores.loc[0, "status"] = "failed"           # failed slide
    scores.loc[1, "tumour_h_score"] = np.nan     # no tumour cells -> null H-score
    clinical = pd.concat([clinical, pd.DataFrame({"pid": ["LOST1"], "best_response": ["CR"]})],
                         ignore_index=True)
    clinical.loc[2, "best_response"] = np.nan    # response not assessed
    r = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=100)
    assert r["unmatched_scores"] == ["EXTRA1", "EXTRA2"]
    assert r["unmatched_clinical"] == ["P000", "P001", "LOST1"]
    assert r["n_unscored"] == 2
    assert [u["slide"] for u in r["unscored"]] == ["P000", "P001"]
    assert "failed" in r["unscored"][0]["reason"]
    assert r["missing_response"] == ["P002"]
    assert r["n_matched"] == 27
    assert r["n_matched"] + len(r["unmatched_clinical"]) + len(r["missing_response"]) == len(clinical)


def test_id_pattern_and_multiple_slides_per_patient():
    scores, clinical = make_cohort(20, seed=4)
    scores["slide"] = [f"{s}_CXCR4_block{i % 2}" for i, s in enumerate(scores.slide)]
    with pytest.raises(CohortError, match="no IDs matched.*--id-pattern"):
        cohort_statistics(scores, clinical, "pid", "best_response")
    r = cohort_statistics(scores, clinical, "pid", "best_response", id_pattern=r"^(P\d+)_",
                          n_bootstrap=100)
    assert r["n_matched"] == 20 and r["unmatched_scores"] == []
    # a second slide of P000 is averaged with a warning
    extra = pd.DataFrame({"slide": ["P000_CXCR4_recut"], "status": "ok", "tumour_h_score": [0.0]})
    scores2 = pd.concat([scores, extra], ignore_index=True)
    r2, table = cohort_statistics(scores2, clinical, "pid", "best_response",
                                  id_pattern=r"^(P\d+)_", n_bootstrap=0, return_table=True)
    assert r2["n_matched"] == 20
    row = table.set_index("_id").loc["P000"]
    assert row["_score"] == pytest.approx(scores.tumour_h_score[0] / 2)
    assert any("averaged" in w for w in r2["warnings"])
    # stems the pattern does not match are unmatched, and an invalid pattern is an error
    r3 = cohort_statistics(scores, clinical, "pid", "best_response", id_pattern=r"^(P00\d)_",
                           n_bootstrap=0)
    assert r3["n_matched"] == 10 and len(r3["unmatched_scores"]) == 10
    with pytest.raises(CohortError, match="invalid --id-pattern"):
        cohort_statistics(scores, clinical, "pid", "best_response", id_pattern="(")


def test_a_slide_listed_twice_counts_once_and_its_last_row_wins():
    # two runs' summary.csv concatenated: P000 appears twice, it is one slide, not two to average
    scores, clinical = make_cohort(12, seed=5)
    again = scores.iloc[[0]].assign(tumour_h_score=250.0)
    r, table = cohort_statistics(pd.concat([scores, again], ignore_index=True), clinical, "pid", "best_response",
                                 n_bootstrap=0, return_table=True)
    row = table.set_index("_id").loc["P000"]
    assert row["_score"] == 250.0 and row["_slides"] == "P000"
    assert any("listed more than once" in w for w in r["warnings"])
    assert not any("averaged" in w for w in r["warnings"])


def test_ids_that_match_slides_without_the_score_are_not_called_unmatched():
    # a single-threshold run: tumour_h_score is null by design, the IDs do match
    scores, clinical = make_cohort(8, seed=7)
    scores["tumour_h_score"] = np.nan
    with pytest.raises(CohortError, match="8 slide\\(s\\) match clinical IDs but none has a tumour_h_score"):
        cohort_statistics(scores, clinical, "pid", "best_response")
    with pytest.raises(CohortError, match="no IDs matched"):
        cohort_statistics(scores.assign(slide=[f"X{i}" for i in range(8)]), clinical, "pid", "best_response")


def test_score_column_option():
    scores, clinical = make_cohort(40, seed=6)
    r = cohort_statistics(scores, clinical, "pid", "best_response", score_column="all_h_score",
                          n_bootstrap=0)
    r0 = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=0)
    assert r["score_column"] == "all_h_score"
    assert r["auc"] == pytest.approx(r0["auc"])  # same ranks
    assert r["odds_ratio_per_100"] != pytest.approx(r0["odds_ratio_per_100"])


# ----------------------------------------------------------------------------- parsing, errors


def test_parse_response_and_event_values():
    v = ["CR", "pr", " PR ", "1", 1, 1.0, True, "yes", "Responder", "SD", "pd", "0", 0, False, "no",
         "non-responder", "Non_Responder", "", None, np.nan]
    out = parse_response(v)
    np.testing.assert_array_equal(out[:9], 1)
    np.testing.assert_array_equal(out[9:17], 0)
    assert np.isnan(out[17:]).all()
    np.testing.assert_array_equal(parse_event([1, 0, "dead", "Alive", "TRUE", "censored"]),
                                  [1, 0, 1, 0, 1, 0])
    with pytest.raises(CohortError, match="'NE'.*row 3.*B"):
        parse_response(["CR", "NE"], ids=["A", "B"])
    with pytest.raises(CohortError, match="'2'"):
        parse_event(["2"])


def test_bad_response_value_and_missing_column_errors():
    scores, clinical = make_cohort(10, seed=0)
    clinical.loc[4, "best_response"] = "mixed"
    with pytest.raises(CohortError) as exc:
        cohort_statistics(scores, clinical, "pid", "best_response")
    assert "'mixed'" in str(exc.value) and "row 6" in str(exc.value) and "P004" in str(exc.value)
    with pytest.raises(CohortError, match="'resp'.*available columns: pid, best_response"):
        cohort_statistics(scores, clinical, "pid", "resp")
    with pytest.raises(CohortError, match="'ki67_h_score' not found in the scores file"):
        cohort_statistics(scores, clinical, "pid", "best_response", score_column="ki67_h_score")
    dup = pd.concat([clinical, clinical.iloc[:1]], ignore_index=True)
    with pytest.raises(CohortError, match="duplicated ID.*P000"):
        cohort_statistics(scores, dup, "pid", "best_response")


# ----------------------------------------------------------------------------- CLI end to end


def test_main_end_to_end(tmp_path, capsys):
    scores, clinical = simulate_cohort(80, odds_ratio_per_100=3.0, seed=2, survival=True)
    clinical["flow_mfi"] = scores.tumour_h_score * 2 + np.random.default_rng(0).normal(0, 50, 80)
    clinical.loc[len(clinical)] = {"patient_id": "S999", "response": "CR", "time_months": 5.0,
                                   "event": 1, "flow_mfi": 1.0}
    run = tmp_path / "run"
    run.mkdir()
    scores.to_csv(run / "summary.csv", index=False)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    argv = ["--scores", str(run / "summary.csv"), "--clinical", str(tmp_path / "clinical.csv"),
            "--id-column", "patient_id", "--response-column", "response",
            "--time-column", "time_months", "--event-column", "event", "--bootstrap", "300"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    r = json.loads((run / "cohort.json").read_text())  # default: next to the scores file
    assert CONTRACT_KEYS <= set(r)
    assert r["n_matched"] == 80 and r["unmatched_clinical"] == ["S999"]
    assert r["logrank_p"] is not None and set(r["spearman"]) == {"flow_mfi"}
    assert f"{r['auc']:.3f}" in out and "T1 (" in out and "flow_mfi" in out
    page = (run / "cohort.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # box, ROC, groups, KM, Spearman
    assert 'id="fig-roc"' in page and f"AUC" in page and f"{r['auc']:.3f}" in page
    assert "S999" in page and "<script" not in page
    assert not list(run.glob("*.tmp"))
    # --out, --cutoff, --no-html; same seed -> same interval
    assert main(argv + ["--out", str(tmp_path / "o"), "--cutoff", "150", "--no-html"]) == 0
    r2 = json.loads((tmp_path / "o" / "cohort.json").read_text())
    assert [g["group"] for g in r2["groups"]] == ["< 150", ">= 150"]
    assert r2["auc_ci"] == r["auc_ci"]
    assert not (tmp_path / "o" / "cohort.html").exists()


def test_main_errors_are_one_line(tmp_path, capsys):
    scores, clinical = make_cohort(12, seed=0)
    clinical["pid"] = [f"00{i}" for i in range(12)]  # IDs with leading zeros stay text
    scores["slide"] = clinical["pid"]
    scores.to_csv(tmp_path / "summary.csv", index=False)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    base = ["--scores", str(tmp_path / "summary.csv"), "--clinical", str(tmp_path / "clinical.csv"),
            "--id-column", "pid", "--bootstrap", "50"]

    def err(argv):
        assert main(argv) == 1
        e = capsys.readouterr().err.strip()
        assert "\n" not in e and e.startswith("ihcscore cohort: error:")
        return e

    assert main(base + ["--response-column", "best_response"]) == 0
    assert json.loads((tmp_path / "cohort.json").read_text())["n_matched"] == 12
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    assert "--out" in err(base + ["--response-column", "best_response", "--out", str(tmp_path / "a_file")])
    assert "not found" in err(["--scores", str(tmp_path / "nope.csv")] + base[2:]
                              + ["--response-column", "best_response"])
    e = err(base + ["--response-column", "response"])
    assert "'response'" in e and "available columns: pid, best_response" in e
    clinical.loc[3, "best_response"] = "unknown"
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    e = err(base + ["--response-column", "best_response"])
    assert "'unknown'" in e and "row 5" in e and "003" in e
    clinical["pid"] = [f"X{i}" for i in range(12)]
    clinical["best_response"] = "PR"
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    assert "no IDs matched" in err(base + ["--response-column", "best_response"])


def test_format_table_shows_nulls():
    scores, clinical = make_cohort(8, seed=0)
    clinical["best_response"] = "PD"
    r = cohort_statistics(scores, clinical, "pid", "best_response")
    text = format_table(r)
    assert "AUC" in text and "—" in text and "warning:" in text


@pytest.mark.parametrize("missing, survival", [("statsmodels", False), ("lifelines", True)])
def test_missing_cohort_extra_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, missing, survival):
    """A plain ``pip install ihcscore`` has neither statsmodels nor lifelines (the [cohort] extra)."""
    scores, clinical = simulate_cohort(20, odds_ratio_per_100=3.0, seed=1, survival=True)
    scores.to_csv(tmp_path / "summary.csv", index=False)
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    argv = ["--scores", str(tmp_path / "summary.csv"), "--clinical", str(tmp_path / "clinical.csv"),
            "--id-column", "patient_id", "--response-column", "response", "--bootstrap", "0"]
    if survival:
        argv += ["--time-column", "time_months", "--event-column", "event"]
    for name in [m for m in sys.modules if m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, missing, None)
    assert cli_main(["cohort"] + argv) == 2
    e = capsys.readouterr().err.strip()
    assert "\n" not in e and e.startswith("ihcscore cohort: error:")
    assert missing in e and "pip install 'ihcscore[cohort]'" in e
    assert not (tmp_path / "cohort.json").exists()
    # the library raises the same one-line error (a CohortError) where the module is needed
    with pytest.raises(MissingExtraError, match=r"ihcscore\[cohort\]"):
        cohort_statistics(scores, clinical, "patient_id", "response", n_bootstrap=0,
                          time_column="time_months" if survival else None,
                          event_column="event" if survival else None)


# ----------------------------------------------------------------------------- small and awkward cohorts


def test_tertiles_with_an_empty_bin_give_the_groups_that_hold_patients():
    """Four scores: a quantile lands on a score and one of qcut's three bins is empty (it crashed)."""
    h = np.array([225.0, 134.0, 266.0, 191.0])
    scores = pd.DataFrame({"slide": list("abcd"), "status": "ok", "tumour_h_score": h})
    clinical = pd.DataFrame({"id": list("abcd"), "r": ["PR", "PD", "PR", "PD"]})
    r = cohort_statistics(scores, clinical, "id", "r", n_bootstrap=0)
    groups = r["groups"]
    assert sum(g["n"] for g in groups) == 4 and all(g["n"] > 0 for g in groups)
    # every patient in one group, the groups in order of score, each named by its range
    ranges = [tuple(float(v) for v in g["group"].split("(")[1].rstrip(")").split("–")) for g in groups]
    assert [g["group"].split()[0] for g in groups] == [f"T{k}" for k in range(1, len(groups) + 1)]
    assert ranges[0][0] == 134.0 and ranges[-1][1] == 266.0
    assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    assert [g["n"] for g in groups] == [int(((h >= lo) & (h <= hi)).sum()) for lo, hi in ranges]
    assert (len(groups) < 3) == any("instead of 3" in w for w in r["warnings"])


def test_id_pattern_whose_group_sits_out_the_match():
    scores = pd.DataFrame({"slide": ["P1_a", "P2_a", "P3_a", "P4_a", "Q9_x"], "status": "ok",
                           "tumour_h_score": [10.0, 200.0, 30.0, 250.0, 99.0]})
    clinical = pd.DataFrame({"id": ["P1", "P2", "P3", "P4"], "r": ["PD", "PR", "PD", "PR"]})
    r = cohort_statistics(scores, clinical, "id", "r", id_pattern=r"^(P\d+)_|^Q\d+_", n_bootstrap=0)
    assert r["n_matched"] == 4 and r["unmatched_scores"] == ["Q9_x"]


def test_ids_that_match_only_failed_slides_are_named_with_an_id_pattern_too():
    scores = pd.DataFrame({"slide": ["P1_cxcr4", "P2_cxcr4", "P3_cxcr4", "P4_cxcr4", "P6_cxcr4"],
                           "status": ["ok"] * 4 + ["failed"], "tumour_h_score": [10.0, 200.0, 30.0, 250.0, None]})
    clinical = pd.DataFrame({"id": ["P1", "P2", "P3", "P4", "P6"], "r": ["PD", "PR", "PD", "PR", "PR"]})
    r = cohort_statistics(scores, clinical, "id", "r", id_pattern=r"^(P\d+)_", n_bootstrap=0)
    assert r["unmatched_clinical"] == ["P6"]
    assert "1 clinical ID(s) match only unscored slides" in r["warnings"]


def test_numeric_clinical_column_with_a_text_cell_is_correlated_and_the_cell_reported():
    from scipy.stats import spearmanr

    scores, clinical = make_cohort(40, seed=3)
    ki67 = np.round(scores["tumour_h_score"].to_numpy() / 3 + np.random.default_rng(1).normal(0, 10, 40), 1)
    clinical["ki67"] = [str(v) for v in ki67]
    clinical.loc[5, "ki67"] = "unknown"
    clinical["site"] = ["lung", "skin"] * 20  # text: not correlated, not reported
    r = cohort_statistics(scores, clinical, "pid", "best_response", n_bootstrap=0)
    keep = np.arange(40) != 5
    rho, p = spearmanr(scores["tumour_h_score"].to_numpy()[keep], ki67[keep])
    assert r["spearman"]["ki67"]["n"] == 39
    assert r["spearman"]["ki67"]["rho"] == pytest.approx(rho) and r["spearman"]["ki67"]["p"] == pytest.approx(p)
    assert "site" not in r["spearman"]
    assert any("'ki67'" in w and "'unknown'" in w for w in r["warnings"])


def test_odds_ratio_of_a_score_that_is_not_an_h_score_is_also_given_per_point():
    import statsmodels.api as sm

    rng = np.random.default_rng(2)
    allred = rng.integers(0, 9, 80).astype(float)
    resp = rng.random(80) < 1 / (1 + np.exp(-(allred - 4) * 0.3))
    ids = [f"S{i}" for i in range(80)]
    scores = pd.DataFrame({"slide": ids, "status": "ok", "tumour_allred": allred})
    clinical = pd.DataFrame({"id": ids, "r": np.where(resp, "CR", "SD")})
    r = cohort_statistics(scores, clinical, "id", "r", score_column="tumour_allred", n_bootstrap=0)
    fit = sm.Logit(resp.astype(int), sm.add_constant(allred)).fit(disp=0)
    assert r["odds_ratio_per_point"] == pytest.approx(math.exp(fit.params[1]), rel=1e-6)
    assert r["odds_ratio_per_point_ci"] == pytest.approx(np.exp(fit.conf_int()[1]).tolist(), rel=1e-6)
    assert r["odds_ratio_per_100"] == pytest.approx(math.exp(100 * fit.params[1]), rel=1e-6)
    assert any(w.startswith("odds_ratio_per_100 is per 100 points of tumour_allred") for w in r["warnings"])
    h = cohort_statistics(*make_cohort(80, seed=4), "pid", "best_response", n_bootstrap=0)
    assert not any("odds_ratio_per_100 is per" in w for w in h["warnings"])


def test_a_collapsed_bootstrap_interval_is_flagged():
    scores = pd.DataFrame({"slide": list("abcd"), "status": "ok", "tumour_h_score": [10.0, 20.0, 200.0, 210.0]})
    clinical = pd.DataFrame({"id": list("abcd"), "r": ["PD", "PD", "PR", "PR"]})
    r = cohort_statistics(scores, clinical, "id", "r", n_bootstrap=500)
    assert r["auc_ci"] == [1.0, 1.0] and r["mannwhitney_p"] > 0.3
    assert any("bootstrap interval [1.000, 1.000] is not reliable" in w for w in r["warnings"])
