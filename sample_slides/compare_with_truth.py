"""Print ihcscore's scores next to the computed truth of the synthetic sample slides.

    python sample_slides/compare_with_truth.py results/cxcr4 results/ki67

For every ``<slide>.truth.json`` beside this script with a ``<results>/<slide>/summary.json``,
one row per compartment: true and measured tumour H-score, all-cell H-score and cell counts.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(results_dirs) -> int:
    rows = []
    for truth_file in sorted(HERE.glob("*.truth.json")):
        stem = truth_file.name[: -len(".truth.json")]
        found = [d / stem / "summary.json" for d in results_dirs if (d / stem / "summary.json").is_file()]
        if not found:
            continue
        summary_file = found[0]
        truth = json.loads(truth_file.read_text())
        if not truth.get("n_cells"):
            continue  # blank glass: nothing to compare
        ours = json.loads(summary_file.read_text())
        for comp in ("nucleus", "cytoplasm", "membrane", "cell"):
            t = {g: truth["scores"][g]["by_compartment"][comp] for g in ("tumour", "all")}
            o = {g: (ours[g]["by_compartment"] or {}).get(comp) or {} for g in ("tumour", "all")}
            mark = " <- DAB painted here" if comp == truth.get("scored_compartment") else ""
            rows.append((stem, comp, t["tumour"]["h_score"], o["tumour"].get("h_score"),
                         t["all"]["h_score"], o["all"].get("h_score"), t["tumour"]["n"], o["tumour"].get("n"), mark))
    if not rows:
        print(f"no synthetic slide results with truth found in {', '.join(map(str, results_dirs))}")
        return 0

    def f(v):
        return "   –  " if v is None else f"{v:6.1f}"

    print("\nSynthetic slides: ihcscore vs computed truth (H-score 0-300; tumour cells and all cells)")
    print(f"{'slide':28s} {'compartment':11s} {'tumour truth':>12s} {'ours':>6s} {'all truth':>10s} {'ours':>6s}"
          f" {'tumour n truth':>14s} {'ours':>5s}")
    for stem, comp, th, oh, ta, oa, tn, on, mark in rows:
        print(f"{stem:28s} {comp:11s} {f(th):>12s} {f(oh):>6s} {f(ta):>10s} {f(oa):>6s} {tn:14d} {on if on is not None else '–':>5}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main([Path(a) for a in sys.argv[1:]] or [Path("results")]))
