"""Tests for ihcscore.report: slide report and cohort index HTML (+ headless Chromium check)."""

import base64
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ihcscore.export import summary_row
from ihcscore.report import (
    cohort_index_html,
    scoring_measurement,
    slide_report_html,
    write_cohort_index,
    write_slide_report,
)

REPO = Path(__file__).resolve().parents[1]
MPP = 0.5
THRESHOLDS = [0.2, 0.4, 0.6]


def _example_image():
    """The scikit-image IHC sample (bundled, 512x512 RGB, DAB + hematoxylin)."""
    from skimage import data

    return data.immunohistochemistry()


def _example_cells(rgb):
    """Cells at local maxima of the stain, binned on DAB OD (a stand-in for the pipeline)."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max

    hed = rgb2hed(rgb)
    stain = ndi.gaussian_filter(hed[..., 0] + hed[..., 2], 3)
    pts = peak_local_max(stain, min_distance=7, threshold_rel=0.35)
    dab = ndi.uniform_filter(hed[..., 2], 7)
    od = np.clip((dab[pts[:, 0], pts[:, 1]] - 0.07) * 6.0, 0, None)  # spread over the bins
    bins = np.digitize(od, THRESHOLDS).astype(np.int8)
    rng = np.random.default_rng(0)
    n = len(pts)
    x, y = pts[:, 1].astype(float), pts[:, 0].astype(float)
    cls = np.where(rng.random(n) < 0.7, "tumour", "other")
    return pd.DataFrame({
        "x_px": x, "y_px": y, "x_um": x * MPP, "y_um": y * MPP, "class": cls, "bin": bins,
        "Nucleus: Area µm^2": rng.uniform(20, 60, n),
        "Cell: DAB OD mean": od,
        "Nucleus: DAB OD mean": od * 0.8,
    })


def _group(bins):
    n = len(bins)
    c = [int((bins == k).sum()) for k in range(4)]
    h = (c[1] + 2 * c[2] + 3 * c[3]) / n * 100 if n else None
    pos = (c[1] + c[2] + c[3]) / n * 100 if n else None
    return {"n": n, "n_0": c[0], "n_1": c[1], "n_2": c[2], "n_3": c[3], "h_score": h,
            "percent_positive": pos, "allred": 7, "irs": 6}


def _example_summary(cells, slide="CXCR4-demo-01"):
    t = cells[cells["class"] == "tumour"]["bin"].to_numpy()
    a = cells["bin"].to_numpy()
    comps = ("nucleus", "cytoplasm", "membrane", "cell")
    return {
        "slide": slide, "mpp": MPP, "preset": "cxcr4",
        "stain_vectors": {"hematoxylin": [0.65111, 0.70119, 0.29049], "dab": [0.26917, 0.56824, 0.77759],
                          "residual": [0.6330, -0.7140, 0.2987], "name": "H-DAB default"},
        "background_rgb": [255, 255, 255], "thresholds": THRESHOLDS, "compartment": "cell",
        "n_cells": int(len(cells)),
        "tumour": dict(_group(t), by_compartment={c: _group(t) for c in comps}),
        "all": dict(_group(a), by_compartment={c: _group(a) for c in comps}),
        "software_version": "0.2.0", "runtime_s": 12.34,
        "warnings": ["Stain vectors estimated from a small region (3 % of tissue): check the DAB vector."],
        "regions": [
            {"name": "Tumour core", "area_mm2": 1.25, "tumour": _group(t[: len(t) // 2])},
            {"name": "Invasive margin", "area_mm2": 0.5, "tumour": _group(t[len(t) // 2:])},
        ],
    }


@pytest.fixture(scope="module")
def example():
    rgb = _example_image()
    cells = _example_cells(rgb)
    summary = _example_summary(cells)
    sel = cells[(cells.x_px >= 256) & (cells.y_px < 512)].copy()
    sel["nucleus_polygon"] = [np.array([[x - 4, y - 3], [x + 4, y - 3], [x + 4, y + 3], [x - 4, y + 3]])
                              for x, y in zip(sel.x_px, sel.y_px)]
    sel["cell_polygon"] = [np.array([[x - 9, y - 8], [x + 9, y - 8], [x + 9, y + 8], [x - 9, y + 8]])
                           for x, y in zip(sel.x_px, sel.y_px)]
    batch_cells = sel
    mask = np.zeros((64, 64), bool)
    mask[6:58, 4:60] = True
    fields = [
        (rgb[:200, :200], cells[(cells.x_px < 200) & (cells.y_px < 200)].rename(columns={"x_px": "x", "y_px": "y"}),
         "Field 1 (0, 0), 100 × 100 µm"),
        {"rgb": rgb[256:456, 256:456], "title": "Field 2 (256, 256), 100 × 100 µm",
         "cells": [{"x": r.x_px - 256, "y": r.y_px - 256, "bin": r.bin,
                    "polygon": [(r.x_px - 256 + 5 * np.cos(a), r.y_px - 256 + 5 * np.sin(a))
                                for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]}
                   for r in cells.itertuples() if 256 <= r.x_px < 456 and 256 <= r.y_px < 456]},
        # as batch.py passes it: level-0 cell table + the field's origin and downsample
        {"rgb": rgb[0:512:2, 256:512:2], "origin_px": (256, 0), "downsample": 2.0, "cells": batch_cells},
    ]
    return {"rgb": rgb, "cells": cells, "summary": summary, "mask": mask, "fields": fields}


def test_scoring_measurement():
    assert scoring_measurement({"compartment": "nucleus"}) == "Nucleus: DAB OD mean"
    assert scoring_measurement({"compartment": "membrane", "statistic": "max"}) == "Membrane: DAB OD max"
    assert scoring_measurement({"measurement": "Cell: DAB OD mean"}) == "Cell: DAB OD mean"


def test_slide_report_contents(example):
    s = example["summary"]
    page = slide_report_html(s, example["cells"], thumbnail=example["rgb"], tissue_mask=example["mask"],
                             fields=example["fields"], thumbnail_downsample=1.0)
    assert page.startswith("<!DOCTYPE html>")
    assert s["slide"] in page
    # numbers of the score table, formatted with their units
    assert f"{s['tumour']['h_score']:.1f}" in page
    assert f"{s['tumour']['percent_positive']:.1f} %" in page
    assert f">{s['tumour']['n']}<" in page and f">{s['all']['n']}<" in page
    assert 'id="score-table"' in page and "H-score (0–300)" in page and "Positive (%)" in page
    assert page.count("(scoring)") == 1  # the headline group's row of the scoring compartment
    # warnings prominent, near the top
    assert 'role="alert"' in page and page.index('role="alert"') < page.index('id="score-table"')
    assert "check the DAB vector" in page
    # regions, parameters
    assert 'id="regions-table"' in page and "Invasive margin" in page and "area (mm²)" in page
    assert "0.200 / 0.400 / 0.600 OD" in page and "(0.6511, 0.7012, 0.2905)" in page
    assert "0.5000 µm/px" in page and "ihcscore 0.2.0" in page and "12.3 s" in page
    # self-contained: images embedded, nothing fetched
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert len(imgs) == 5  # thumbnail, histogram, 3 fields
    assert "Field 3 at (256, 0) px, 128 × 256 µm" in page
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_slide_report_minimal_and_escaping():
    s = {"slide": "<b>x</b>", "thresholds": [0.3], "compartment": "nucleus",
         "tumour": {"n": 0, "h_score": None, "percent_positive": None}, "all": {"n": 0}}
    page = slide_report_html(s, None)
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "–" in page  # missing numbers shown as a dash, never 0
    assert 'role="alert"' not in page


def test_cohort_index_contents(tmp_path):
    rows = [summary_row({"slide": f"S{i}", "n_cells": 100 * i, "tumour": {"n": 50 * i, "h_score": 30.0 * i}},
                        "ok", 1.0 + i) for i in range(1, 6)]
    rows.append(summary_row(None, "failed", 0.2, error="SlideError: cannot read", slide="S9"))
    page = cohort_index_html(rows)
    assert 'href="S3/report.html"' in page and 'href="S9/report.html"' not in page
    assert "150.0" in page and "SlideError: cannot read" in page
    assert "median tumour H-score 90.0" in page
    assert page.count("<img") == 1
    # a '#' or '?' in a slide name is percent-encoded in the link (it would end the path)
    odd = cohort_index_html([summary_row({"slide": "a#1 ?b", "n_cells": 1, "tumour": {"n": 1}}, "ok", 1.0)])
    assert 'href="a%231%20%3Fb/report.html"' in odd and ">a#1 ?b</a>" in odd
    p = write_cohort_index(tmp_path / "index.html", rows, {"S1": "x/S1.html"})
    assert 'href="x/S1.html"' in p.read_text(encoding="utf-8")


def test_headline_follows_the_presets_scored_cells():
    """A preset scoring all cells (``scoring.cells = "all"``) heads its report and the index with all cells."""
    by_comp = {c: {"n": 10, "h_score": h} for c, h in (("nucleus", 11.0), ("cell", 22.0))}
    s = {"slide": "s", "thresholds": [0.2, 0.4, 0.6], "compartment": "nucleus", "n_cells": 40,
         "tumour": {"n": 10, "h_score": 55.5, "percent_positive": 12.5, "by_compartment": by_comp},
         "all": {"n": 40, "h_score": 77.7, "percent_positive": 33.3, "by_compartment": by_comp}}
    for cells, head, other in (("tumour", "55.5", "77.7"), ("all", "77.7", "55.5")):
        page = slide_report_html({**s, "scored_cells": cells}, None)
        kpis = page.split('class="headline"', 1)[1].split("<h2>", 1)[0]
        assert head in kpis and other not in kpis
        scoring_rows = re.findall(r'<tr class="scoring">(.*?)</tr>', page)
        assert len(scoring_rows) == 1 and f">{cells}<" in scoring_rows[0] and "nucleus" in scoring_rows[0]
    rows = [summary_row({"slide": f"S{i}", "scored_cells": "all", "tumour": {"h_score": 1.0},
                         "all": {"h_score": 10.0 * i}}, "ok", 1.0) for i in (1, 2, 3)]
    assert rows[0]["scored_cells"] == "all"
    assert "median all-cell H-score 20.0" in cohort_index_html(rows)


def test_hotspots_and_parameters_of_a_single_threshold_preset():
    """One threshold: no H-score, so the hotspot table shows a dash (it printed 'nan' as text) and the heat map
    shows positive %, cut at the slide's edge; OD parameters carry their unit; no outline is promised when the
    mask covers the whole thumbnail."""
    grid = pd.DataFrame({"x0_um": [0.0, 500.0], "y0_um": [0.0, 0.0], "size_um": [500.0, 500.0],
                         "n": [80, 90], "h_score": [float("nan")] * 2, "percent_positive": [20.0, 40.0]})
    s = {"slide": "s", "thresholds": [0.2], "compartment": "nucleus", "mpp": 0.5, "dimensions_px": [1400, 600],
         "tumour": {"n": 170}, "all": {"n": 170},
         "hotspots": {"grid_um": 500, "min_cells": 50,
                      "top": [{"x0_um": 500.0, "y0_um": 0.0, "n": 90, "h_score": float("nan"),
                               "percent_positive": 40.0}]},
         "preset_parameters": {"detection": {"threshold": 0.7, "max_background": 2.0}, "scoring": {"thresholds": [0.2]}}}
    page = slide_report_html(s, None, thumbnail=np.full((30, 70, 3), 200, np.uint8), tissue_mask=np.ones((3, 7), bool),
                             thumbnail_downsample=20.0, hotspot_grid=grid)
    table = page.split('id="hotspots-table"', 1)[1].split("</table>", 1)[0]
    assert ">nan<" not in table and "–" in table
    assert "Positive % heat map" in page and "H-score heat map" not in page
    assert "blue line" not in page
    params = page.split("<h2>Parameters</h2>", 1)[1]
    assert re.search(r"threshold \(OD\)", params) and re.search(r"max background \(OD\)", params)


# ----------------------------------------------------------------------------- browser
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _column(table, col):
    return [r.find_elements("tag name", "td")[col].text for r in table.find_elements("css selector", "tbody tr")]


def _fit_window(driver, width=1280, max_height=4000):
    """Make the viewport as tall as the page, for a full-page screenshot."""
    driver.set_window_size(width, 600)  # the document is never shorter than the viewport
    js = "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    height, chrome = driver.execute_script(js)
    driver.set_window_size(width, min(int(height) + int(chrome) + 10, max_height))


def _save_small_png(driver, path):
    """Screenshot quantised to 256 colours (a few hundred kB for the docs)."""
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _severe(driver):
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="needs /usr/bin/chromium and /usr/bin/chromedriver")
def test_reports_in_headless_chromium(example, tmp_path):
    (tmp_path / "S1").mkdir()
    report = write_slide_report(tmp_path / "S1" / "report.html", example["summary"], example["cells"],
                                thumbnail=example["rgb"], tissue_mask=example["mask"],
                                fields=example["fields"], thumbnail_downsample=1.0)
    hs = [120.0, 15.0, 250.0, 80.0, 143.5, 201.0, 96.2]
    rows = [summary_row({"slide": f"S{i}", "n_cells": 1000 * i + 17,
                         "tumour": {"n": 600 * i, "h_score": h, "percent_positive": min(h / 2.2, 100.0),
                                    "allred": 3 + i % 5, "irs": 2 * (i % 4)},
                         "all": {"n": 1000 * i + 17, "h_score": h * 0.8, "percent_positive": h / 3.0}},
                        "ok", 20.0 + i)
            for i, h in enumerate(hs, start=1)]
    rows.append(summary_row(None, "failed", 0.4, error="SlideError: S8.svs: not a slide", slide="S8"))
    index = write_cohort_index(tmp_path / "index.html", rows)
    driver = _driver()
    try:
        driver.get(report.as_uri())
        assert example["summary"]["slide"] in driver.title
        table = driver.find_element("id", "score-table")
        col_h = 7  # H-score column
        before = _column(table, col_h)
        assert len(before) == 8
        groups_before = _column(table, 0)
        table.find_elements("css selector", "thead th")[2].click()  # n (cells)
        n_sorted = [int(v) for v in _column(table, 2)]
        assert n_sorted == sorted(n_sorted)
        table.find_elements("css selector", "thead th")[2].click()  # again: descending
        n_sorted = [int(v) for v in _column(table, 2)]
        assert n_sorted == sorted(n_sorted, reverse=True)
        assert _column(table, 0) != groups_before  # order changed: "all" rows (more cells) first
        assert _column(table, 0)[0] == "all"
        th_comp = table.find_elements("css selector", "thead th")[1]
        th_comp.click()
        th_comp.click()
        assert th_comp.get_attribute("aria-sort") == "descending"
        comps = [c.removesuffix(" (scoring)") for c in _column(table, 1)]  # sorted on the compartment
        assert comps == sorted(comps, reverse=True)
        imgs = driver.find_elements("tag name", "img")
        assert len(imgs) == 5
        assert all(driver.execute_script("return arguments[0].naturalWidth", im) > 0 for im in imgs)
        assert driver.find_element("id", "warnings").is_displayed()
        assert _severe(driver) == []
        if os.environ.get("IHCSCORE_SAVE_SCREENSHOTS") == "1":
            driver.get(report.as_uri())
            _fit_window(driver)
            out = REPO / "docs" / "img"
            out.mkdir(parents=True, exist_ok=True)
            _save_small_png(driver, out / "report_example.png")

        driver.get(index.as_uri())
        table = driver.find_element("id", "cohort-table")
        shown = [f"{h:.1f}" for h in hs] + ["–"]
        assert _column(table, 4) == shown
        table.find_elements("css selector", "thead th")[4].click()
        assert _column(table, 4) == [f"{h:.1f}" for h in sorted(hs)] + ["–"]  # missing last
        table.find_elements("css selector", "thead th")[4].click()
        assert _column(table, 4) == [f"{h:.1f}" for h in sorted(hs, reverse=True)] + ["–"]
        link = table.find_element("link text", "S3")
        assert link.get_attribute("href").endswith("S3/report.html")
        assert _severe(driver) == []
        if os.environ.get("IHCSCORE_SAVE_SCREENSHOTS") == "1":
            _fit_window(driver)
            _save_small_png(driver, REPO / "docs" / "img" / "report_index_example.png")
    finally:
        driver.quit()


def test_hotspot_heat_map_in_report():
    import pandas as pd

    from ihcscore.report import slide_report_html

    grid = pd.DataFrame({"x0_um": [0.0, 500.0], "y0_um": [0.0, 0.0], "size_um": [500.0, 500.0], "n": [80, 10],
                         "h_score": [150.0, float("nan")], "percent_positive": [60.0, float("nan")]})
    summary = {"slide": "s", "mpp": 0.5, "thresholds": [0.2, 0.4, 0.6], "compartment": "cell", "n_cells": 0,
               "tumour": {"n": 0}, "all": {"n": 0},
               "hotspots": {"grid_um": 500.0, "min_cells": 50,
                            "top": [{"x0_um": 0.0, "y0_um": 0.0, "size_um": 500.0, "n": 80, "h_score": 150.0,
                                     "percent_positive": 60.0}]}}
    html = slide_report_html(summary, hotspot_grid=grid)
    assert 'alt="H-score heat map"' in html and "hotspots-table" in html
    assert 'alt="H-score heat map"' not in slide_report_html(summary)


def test_index_links_reports_of_slides_scored_ok_only(tmp_path):
    """A slide whose rescore failed keeps an old report.html on disk: the index must not link it."""
    from ihcscore.export import update_folder_tables

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "report.html").write_text("old")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "report.html").write_text("new")
    rows = [summary_row(None, "failed", 0.1, error="boom", slide="s"),
            summary_row({"slide": "t", "n_cells": 1, "tumour": {"n": 1}}, "ok", 1.0)]
    update_folder_tables(tmp_path, rows, index=True)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert 'href="t/report.html"' in page and 'href="s/report.html"' not in page
