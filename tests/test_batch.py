"""Folders of slides: failures isolated, exit codes, resume, and a SIGKILL mid-slide."""

import csv
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ihcscore.cli import main
from ihcscore.export import COMPLETE_MARKER, file_sample
from ihcscore.synthetic import make_synthetic_slide

SCORE_ARGS = ["--tile-size", "256", "--no-report", "--quiet", "--tissue", "all"]


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _summary(out_dir):
    s = json.loads((Path(out_dir) / "summary.json").read_text())
    for k in ("runtime_s", "path"):
        s.pop(k, None)
    return s


@pytest.fixture(scope="module")
def good_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    make_synthetic_slide(root / "a.tif", shape=(768, 768), mpp=0.5, seed=1)
    make_synthetic_slide(root / "b.tif", shape=(768, 768), mpp=0.5, seed=2)
    return root


@pytest.fixture()
def folder(good_slides, tmp_path):
    """a.tif, b.tif (good), c_corrupt.svs (not an image), d_truncated.tif (half a TIFF)."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.tif", "b.tif"):
        os.link(good_slides / name, d / name)
    (d / "c_corrupt.svs").write_text("this is not a slide\n")
    data = (good_slides / "b.tif").read_bytes()
    (d / "d_truncated.tif").write_bytes(data[: len(data) // 2])
    (d / "notes.txt").write_text("ignored: not a slide extension\n")
    return d


def test_failures_isolated_and_exit_code(folder, tmp_path):
    out = tmp_path / "out"
    rc = main(["score", str(folder), "--out", str(out), *SCORE_ARGS])
    assert rc == 1
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"a", "b", "c_corrupt", "d_truncated"}
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert int(rows["a"]["n_cells"]) > 50 and int(rows["b"]["n_cells"]) > 50
    fails = {r["slide"]: r for r in _read_csv(out / "failures.csv")}
    assert set(fails) == {"c_corrupt", "d_truncated"}
    assert "c_corrupt.svs" in fails["c_corrupt"]["error"]
    assert "d_truncated.tif" in fails["d_truncated"]["error"]
    for s in ("a", "b"):
        assert (out / s / COMPLETE_MARKER).is_file() and (out / s / "cells.parquet").is_file()
    assert not (out / "c_corrupt" / COMPLETE_MARKER).exists()
    # only good slides: exit 0
    good = tmp_path / "good"
    good.mkdir()
    os.link(folder / "a.tif", good / "a.tif")
    assert main(["score", str(good), "--out", str(tmp_path / "out_good"), *SCORE_ARGS]) == 0


def test_resume_skips_complete_and_redoes_partial_or_changed(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["score", str(folder), "--out", str(out), *SCORE_ARGS]) == 1
    mtimes = {s: (out / s / "cells.parquet").stat().st_mtime_ns for s in ("a", "b")}
    first = {s: _summary(out / s) for s in ("a", "b")}

    # second run: both skipped (resumed, files untouched), the bad ones retried and failing again
    assert main(["score", str(folder), "--out", str(out), *SCORE_ARGS]) == 1
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["a"]["resumed"] == rows["b"]["resumed"] == "True"
    assert rows["c_corrupt"]["status"] == "failed"
    assert {s: (out / s / "cells.parquet").stat().st_mtime_ns for s in ("a", "b")} == mtimes

    # a partial folder (marker gone, half-written temp file left by a crash) is redone
    (out / "b" / COMPLETE_MARKER).unlink()
    (out / "b" / "cells.parquet.tmp-99999").write_bytes(b"half")
    assert main(["score", str(folder), "--out", str(out), *SCORE_ARGS]) == 1
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["a"]["resumed"] == "True" and rows["b"]["resumed"] == "False"
    assert (out / "b" / COMPLETE_MARKER).is_file()
    assert not list((out / "b").glob("*.tmp-*"))
    assert _summary(out / "b") == first["b"]

    # other parameters (thresholds): nothing is taken as done
    assert main(["score", str(folder), "--out", str(out), *SCORE_ARGS, "--thresholds", "0.25,0.45,0.65"]) == 1
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["a"]["resumed"] == "False" and rows["b"]["resumed"] == "False"
    assert json.loads((out / "a" / "summary.json").read_text())["thresholds"] == [0.25, 0.45, 0.65]


def test_slides_of_one_name_get_their_own_outputs_and_resume_checks_the_file(good_slides, tmp_path):
    # a/x.tif and b/x.tif are different slides: one output folder each, named by their folder
    for sub, src in (("a", "a.tif"), ("b", "b.tif")):
        (tmp_path / sub).mkdir()
        os.link(good_slides / src, tmp_path / sub / "x.tif")
    out, alone = tmp_path / "out", tmp_path / "alone"
    assert main(["score", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *SCORE_ARGS]) == 0
    for sub, src in (("a", "a.tif"), ("b", "b.tif")):
        assert main(["score", str(good_slides / src), "--out", str(alone), *SCORE_ARGS]) == 0
        got, want = _summary(out / f"{sub}_x"), _summary(alone / Path(src).stem)
        assert got.pop("slide") == f"{sub}_x" and want.pop("slide") == Path(src).stem
        assert got == want
    rows = _read_csv(out / "summary.csv")
    assert [r["slide"] for r in rows] == ["a_x", "b_x"] and rows[0]["n_cells"] != rows[1]["n_cells"]
    # one file named three ways is one slide
    same = tmp_path / "same"
    assert main(["score", str(tmp_path / "a"), str(tmp_path / "a" / "x.tif"), str(tmp_path / "b" / ".." / "a"),
                 "--out", str(same), *SCORE_ARGS]) == 0
    assert [r["slide"] for r in _read_csv(same / "summary.csv")] == ["x"]
    assert main(["score", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *SCORE_ARGS]) == 0
    assert [r["resumed"] for r in _read_csv(out / "summary.csv")] == ["True", "True"]
    assert main(["score", str(tmp_path / "a" / "x.tif"), "--out", str(out), *SCORE_ARGS]) == 0  # alone: a_x
    assert {r["slide"]: r["resumed"] for r in _read_csv(out / "summary.csv")} == {"a_x": "True", "b_x": "True"}

    # an earlier run put a/x.tif's outputs in one/x: b/x.tif goes beside them (not over them, nor taken as
    # done), and reruns resume each where it is
    one = tmp_path / "one"
    a_x, b_x = str(tmp_path / "a" / "x.tif"), str(tmp_path / "b" / "x.tif")
    assert main(["score", a_x, "--out", str(one), *SCORE_ARGS]) == 0
    assert main(["score", b_x, "--out", str(one), *SCORE_ARGS]) == 0
    assert {r["slide"]: r["resumed"] for r in _read_csv(one / "summary.csv")} == {"x": "False", "b_x": "False"}
    assert _summary(one / "x") | {"slide": "a"} == _summary(alone / "a")
    assert _summary(one / "b_x") | {"slide": "b"} == _summary(alone / "b")
    assert main(["score", a_x, b_x, "--out", str(one), *SCORE_ARGS]) == 0
    assert {r["slide"]: r["resumed"] for r in _read_csv(one / "summary.csv")} == {"x": "True", "b_x": "True"}
    # outputs written before markers named their slide: the file name in summary.json's path decides
    marker = json.loads((one / "x" / COMPLETE_MARKER).read_text())
    assert marker.pop("source") == {"file": "x.tif", "bytes": (good_slides / "a.tif").stat().st_size,
                                    "sample": file_sample(good_slides / "a.tif"), "path": str(Path(a_x).resolve())}
    (one / "x" / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert main(["score", a_x, "--out", str(one), *SCORE_ARGS]) == 0
    assert {r["slide"]: r["resumed"] for r in _read_csv(one / "summary.csv")}["x"] == "True"
    os.link(good_slides / "a.tif", tmp_path / "y.tif")
    (one / "x").rename(one / "y")  # one/y now holds the outputs of a file named x.tif
    assert main(["score", str(tmp_path / "y.tif"), "--out", str(one), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r["resumed"] for r in _read_csv(one / "summary.csv")}
    assert rows[f"{tmp_path.name}_y"] == "False" and (one / f"{tmp_path.name}_y" / COMPLETE_MARKER).is_file()


def test_a_slide_replaced_in_place_is_rescored_in_its_folder(good_slides, tmp_path):
    """The same path, another file (a rescan): its folder is scored again, not a second folder beside the
    stale one, and summary.csv keeps one row, the new one."""
    slide = tmp_path / "in" / "x.tif"
    slide.parent.mkdir()
    shutil.copy(good_slides / "a.tif", slide)
    out = tmp_path / "out"
    assert main(["score", str(slide), "--out", str(out), *SCORE_ARGS]) == 0
    first = _summary(out / "x")
    slide.unlink()
    shutil.copy(good_slides / "b.tif", slide)
    assert main(["score", str(slide), "--out", str(out), *SCORE_ARGS]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["x"]
    (row,) = _read_csv(out / "summary.csv")
    assert row["slide"] == "x" and row["resumed"] == "False" and int(row["n_cells"]) != first["n_cells"]


def test_replaced_or_moved_slides_keep_the_right_folders(good_slides, tmp_path):
    """A slide moved away while another file takes its old path: the moved one resumes in its folder, the
    newcomer gets its own. A slide in a qualified folder (a_x) replaced in place is rescored there."""
    from ihcscore.batch import output_names

    out = tmp_path / "out"
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    old, moved = tmp_path / "x" / "s.tif", tmp_path / "y" / "s.tif"
    shutil.copy(good_slides / "a.tif", old)
    assert main(["score", str(old), "--out", str(out), *SCORE_ARGS]) == 0
    old.rename(moved)
    shutil.copy(good_slides / "b.tif", old)  # another file where the scored one was
    assert output_names([old, moved], out) == ["x_s", "s"]
    # a_x / b_x, then b/x.tif replaced in place: rescored in b_x, not beside it in x
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_x, b_x = tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"
    shutil.copy(good_slides / "a.tif", a_x)
    shutil.copy(good_slides / "b.tif", b_x)
    two = tmp_path / "two"
    assert main(["score", str(a_x), str(b_x), "--out", str(two), *SCORE_ARGS]) == 0
    b_x.unlink()
    shutil.copy(good_slides / "a.tif", b_x)  # another file (another size) at b/x.tif
    assert (good_slides / "a.tif").stat().st_size != (good_slides / "b.tif").stat().st_size
    assert output_names([b_x], two) == ["b_x"]


def test_resume_rescores_when_the_tissue_file_or_the_outputs_asked_for_change(good_slides, tmp_path):
    """Resuming checks what decides and what makes the result: an edited --tissue file (its content, not its
    name), and outputs this run asks for that the earlier one did not write (--csv, the report)."""
    slide = good_slides / "a.tif"
    out = tmp_path / "out"
    gj = tmp_path / "roi.geojson"
    args = ["--tile-size", "256", "--no-report", "--quiet"]  # SCORE_ARGS without its --tissue all

    def roi(x1):
        gj.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [x1, 0], [x1, 400], [0, 400], [0, 0]]]}}))

    def run(*extra):
        assert main(["score", str(slide), "--out", str(out), "--tissue", str(gj), *args, *extra]) == 0
        (row,) = _read_csv(out / "summary.csv")
        return row

    roi(400)
    first = run()
    assert run()["resumed"] == "True"
    roi(200)  # the same file name, a smaller region
    again = run()
    assert again["resumed"] == "False" and int(again["n_cells"]) < int(first["n_cells"])
    assert run("--csv")["resumed"] == "False" and (out / "a" / "cells.csv").is_file()
    no_report = [a for a in args if a != "--no-report"]
    assert main(["score", str(slide), "--out", str(out), "--tissue", str(gj), *no_report]) == 0
    assert (out / "a" / "report.html").is_file()
    assert 'href="a/report.html"' in (out / "index.html").read_text(encoding="utf-8")
    # the report dropped by a rescore without it: index.html no longer links it
    assert main(["score", str(slide), "--out", str(out), "--tissue", str(gj), "--no-resume", *args]) == 0
    assert not (out / "a" / "report.html").exists()
    assert 'href="a/report.html"' not in (out / "index.html").read_text(encoding="utf-8")


def test_a_rescore_that_dies_leaves_no_ok_row_for_the_slide(good_slides, tmp_path, monkeypatch):
    """Scored, then scored again with other parameters and killed mid-slide: summary.csv must not still say
    "ok" with the earlier numbers for outputs that are no longer complete."""
    from ihcscore import batch

    out = tmp_path / "out"
    assert main(["score", str(good_slides / "a.tif"), "--out", str(out), *SCORE_ARGS]) == 0
    assert [r["slide"] for r in _read_csv(out / "summary.csv")] == ["a"]

    def killed(*args, **kwargs):
        (out / "a" / COMPLETE_MARKER).unlink()  # what write_slide_outputs does first
        raise SystemExit(137)

    monkeypatch.setattr(batch, "score_slide", killed)
    with pytest.raises(SystemExit):
        main(["score", str(good_slides / "a.tif"), "--out", str(out), *SCORE_ARGS, "--thresholds", "0.3"])
    assert [r["slide"] for r in _read_csv(out / "summary.csv")] == []


def test_ome_tiff_outputs_are_named_without_ome_and_resume(good_slides, tmp_path):
    ome = tmp_path / "in" / "case.ome.tif"
    ome.parent.mkdir()
    os.link(good_slides / "a.tif", ome)
    out = tmp_path / "out"
    for resumed in ("False", "True"):
        assert main(["score", str(ome.parent), "--out", str(out), *SCORE_ARGS]) == 0
        (row,) = _read_csv(out / "summary.csv")
        assert row["slide"] == "case" and row["resumed"] == resumed
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["case"]


def test_runs_into_one_folder_keep_each_others_rows(folder, good_slides, tmp_path):
    """One job per slide (a cluster array) or slides scored as they arrive: summary.csv holds them all."""
    out = tmp_path / "out"
    jobs = [subprocess.Popen([sys.executable, "-m", "ihcscore.cli", "score", str(folder / name), "--out", str(out),
                              *[a for a in SCORE_ARGS if a != "--no-report"]], stderr=subprocess.PIPE, text=True)
            for name in ("a.tif", "b.tif", "c_corrupt.svs")]  # at the same time, with index.html
    assert [j.wait(timeout=300) for j in jobs] == [0, 0, 1], [j.stderr.read() for j in jobs]
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert sorted(rows) == ["a", "b", "c_corrupt"] and rows["c_corrupt"]["status"] == "failed"
    assert [f["slide"] for f in _read_csv(out / "failures.csv")] == ["c_corrupt"]
    index = (out / "index.html").read_text()
    assert all(f'{s}/report.html' in index for s in ("a", "b"))
    # scoring a slide again replaces its row (and a slide that now scores loses its failure); the others stay
    first_b = rows["b"]
    (folder / "c_corrupt.svs").unlink()
    shutil.copy(good_slides / "a.tif", folder / "c_corrupt.tif")  # a copy: a hard link to a.tif would be a.tif
    assert main(["score", str(folder / "a.tif"), str(folder / "c_corrupt.tif"), "--out", str(out), *SCORE_ARGS,
                 "--thresholds", "0.3,0.5,0.7"]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert sorted(rows) == ["a", "b", "c_corrupt"] and rows["b"] == first_b
    assert rows["a"]["status"] == rows["c_corrupt"]["status"] == "ok" and rows["a"]["resumed"] == "False"
    assert _read_csv(out / "failures.csv") == []


# ----------------------------------------------------------------------------- SIGKILL mid-slide

DRIVER = r"""
import os, signal, sys
from pathlib import Path
import ihcscore.pipeline as pipeline
import ihcscore.export as export
ticks = Path(sys.argv[1])
mode = sys.argv[2]
orig_tile = pipeline.analyze_tile
def analyze_tile(*a, **k):
    out = orig_tile(*a, **k)
    with open(ticks, "a") as f:   # progress the test can see: one line per finished tile
        f.write("tile\n")
    return out
pipeline.analyze_tile = analyze_tile
if mode == "kill-while-writing":
    orig_parquet = export.write_cells_parquet
    def write_cells_parquet(path, cells):
        if Path(path).parent.name == "big":   # summary.json is already written: die mid-folder
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_parquet(path, cells)
    export.write_cells_parquet = write_cells_parquet
from ihcscore.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def kill_folder(tmp_path_factory, good_slides):
    d = tmp_path_factory.mktemp("kill")
    os.link(good_slides / "a.tif", d / "a.tif")
    make_synthetic_slide(d / "big.tif", shape=(1024, 1024), mpp=0.5, seed=4)  # 16 tiles of 256 px
    return d


@pytest.fixture(scope="module")
def clean_run(kill_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    assert main(["score", str(kill_folder), "--out", str(out), *SCORE_ARGS]) == 0
    return out


def _assert_same_outputs(out, ref):
    for s in ("a", "big"):
        assert _summary(out / s) == _summary(ref / s)
        pd.testing.assert_frame_equal(pd.read_parquet(out / s / "cells.parquet"),
                                      pd.read_parquet(ref / s / "cells.parquet"), check_exact=True)
        # byte for byte: feature ids too (from the slide file and the parameters, not random)
        assert (out / s / "cells.geojson").read_bytes() == (ref / s / "cells.geojson").read_bytes()


@pytest.mark.parametrize("mode", ["kill-mid-tiles", "kill-while-writing"])
def test_sigkill_mid_slide_then_rerun_is_identical(kill_folder, clean_run, tmp_path, mode):
    out = tmp_path / "out"
    ticks = tmp_path / "ticks.txt"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(ticks), mode, "score", str(kill_folder), "--out", str(out),
           *SCORE_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        if mode == "kill-mid-tiles":
            # a.tif has 9 tiles; wait until big.tif has some done (and is not finished), then SIGKILL
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                n = len(ticks.read_text().splitlines()) if ticks.exists() else 0
                if n >= 9 + 3:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, "the run finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_ticks = len(ticks.read_text().splitlines())
    if mode == "kill-mid-tiles":
        assert n_ticks < 9 + 16  # killed before the last tile of big.tif
    # the finished slide is complete, the interrupted one is not taken as done
    assert (out / "a" / COMPLETE_MARKER).is_file()
    assert not (out / "big" / COMPLETE_MARKER).exists()
    if mode == "kill-while-writing":
        assert (out / "big" / "summary.json").is_file()  # half a folder: summary written, no cells, no marker
        assert not (out / "big" / "cells.parquet").exists()
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"a"}  # summary.csv holds the finished slide only
    a_mtime = (out / "a" / "cells.parquet").stat().st_mtime_ns

    # rerun (plain CLI): a is skipped, big is redone, results identical to a clean run
    rc = subprocess.run([sys.executable, "-m", "ihcscore.cli", "score", str(kill_folder), "--out", str(out),
                         *SCORE_ARGS], capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["a"]["resumed"] == "True" and rows["big"]["status"] == "ok"
    assert (out / "a" / "cells.parquet").stat().st_mtime_ns == a_mtime
    assert (out / "big" / COMPLETE_MARKER).is_file()
    _assert_same_outputs(out, clean_run)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_stops_in_one_line_and_rerun_is_identical(kill_folder, clean_run, tmp_path, how):
    """A terminal's Ctrl-C (SIGINT to the whole process group, workers included) mid-slide, or SIGTERM to the
    main process (a batch system's time limit, `timeout`, `docker stop`): one line, nothing left behind."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    ticks = tmp_path / "ticks.txt"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    tmp = tmp_path / "tmp"  # where the tile tables are spilled
    tmp.mkdir()
    cmd = [sys.executable, str(driver), str(ticks), "kill-mid-tiles", "score", str(kill_folder), "--out", str(out),
           *SCORE_ARGS, "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ticks.exists() and len(ticks.read_text().splitlines()) >= 9 + 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        workers = psutil.Process(proc.pid).children(recursive=True)
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == (130 if how == "ctrl-c" else 143)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Terminated" not in err, err
    word = "interrupted" if how == "ctrl-c" else "terminated"
    assert err.splitlines()[-1] == f"{word} (finished slides are kept: the same command resumes)"
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive
    assert (out / "a" / COMPLETE_MARKER).is_file() and not (out / "big" / COMPLETE_MARKER).exists()
    assert not list(out.rglob("*.tmp-*")) and not list(tmp.iterdir())
    assert not list(out.glob("*/.ihcscore-source.json"))  # the claims of the slides not finished are released
    assert main(["score", str(kill_folder), "--out", str(out), *SCORE_ARGS]) == 0
    _assert_same_outputs(out, clean_run)


def test_sigkill_of_the_main_process_ends_its_tile_workers(kill_folder, tmp_path):
    """`kill -9` of `ihcscore score --workers 2` alone (not its group) leaves no orphaned workers behind."""
    psutil = pytest.importorskip("psutil")
    ticks = tmp_path / "ticks.txt"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(ticks), "kill-mid-tiles", "score", str(kill_folder / "big.tif"),
           "--out", str(tmp_path / "out"), *SCORE_ARGS, "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if ticks.exists() and len(ticks.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)  # the main process only
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of this test's own session
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- awkward folders and files

def _uncompressed(path, value, seed=None):
    """A 512² uncompressed TIFF at 0.5 µm/px: every one of them has the same size in bytes."""
    import numpy as np
    import tifffile

    if seed is None:
        rgb = np.full((512, 512, 3), value, np.uint8)
    else:
        from ihcscore.synthetic import make_synthetic_region

        rgb = make_synthetic_region((512, 512), 0.5, seed=seed)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    return path


def test_another_slide_of_the_same_name_and_size_is_not_taken_as_scored(tmp_path):
    """Uncompressed slides of one shape have one size: name and size alone took b/x.tif as a/x.tif scored."""
    a = _uncompressed(tmp_path / "a" / "x.tif", 0, seed=3)
    b = _uncompressed(tmp_path / "b" / "x.tif", 240)
    assert a.stat().st_size == b.stat().st_size
    out = tmp_path / "out"
    assert main(["score", str(a), "--out", str(out), *SCORE_ARGS]) == 0
    assert main(["score", str(b), "--out", str(out), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"x", "b_x"} and rows["b_x"]["resumed"] == "False"
    assert int(rows["x"]["n_cells"]) > 50 and int(rows["b_x"]["n_cells"]) == 0
    # re-exported in place with the same size: scored again, in its folder
    _uncompressed(a, 240)
    assert main(["score", str(a), "--out", str(out), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["x"]["resumed"] == "False" and int(rows["x"]["n_cells"]) == 0


def test_same_stem_slides_in_one_folder_keep_their_folders_in_any_order(good_slides, tmp_path):
    """x.tif and x.tiff side by side: named by their file names, so a rerun in another order or of one of
    them alone finds its own outputs (the order-given -2 suffix moved them between folders)."""
    d = tmp_path / "dd"
    d.mkdir()
    shutil.copy(good_slides / "a.tif", d / "x.tif")
    shutil.copy(good_slides / "b.tif", d / "x.tiff")
    out = tmp_path / "out"
    assert main(["score", str(d), "--out", str(out), *SCORE_ARGS]) == 0
    first = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(first) == {"dd_x.tif", "dd_x.tiff"}
    for args in ([d / "x.tiff"], [d / "x.tiff", d / "x.tif"], [d]):
        assert main(["score", *map(str, args), "--out", str(out), *SCORE_ARGS]) == 0
        rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
        assert set(rows) == set(first)
        assert rows["dd_x.tiff"]["resumed"] == "True" and rows["dd_x.tiff"]["n_cells"] == first["dd_x.tiff"]["n_cells"]
        if len(args) > 1 or args == [d]:
            assert rows["dd_x.tif"]["resumed"] == "True" and rows["dd_x.tif"]["n_cells"] == first["dd_x.tif"]["n_cells"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["dd_x.tif", "dd_x.tiff"]


def test_concurrent_runs_of_same_named_slides_get_their_own_folders(good_slides, tmp_path):
    """Two jobs started together into one folder, X/s.tif and Y/s.tif: each claims its folder under the lock
    (both used to choose `s`, and one overwrote the other)."""
    for d, src in (("X", "a.tif"), ("Y", "b.tif")):
        (tmp_path / d).mkdir()
        shutil.copy(good_slides / src, tmp_path / d / "s.tif")
    out = tmp_path / "out"
    jobs = [subprocess.Popen([sys.executable, "-m", "ihcscore.cli", "score", str(tmp_path / d / "s.tif"), "--out",
                              str(out), *SCORE_ARGS], stderr=subprocess.PIPE, text=True) for d in ("X", "Y")]
    assert [j.wait(timeout=300) for j in jobs] == [0, 0], [j.stderr.read() for j in jobs]
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert len(rows) == 2 and "s" in rows
    counts = sorted(int(r["n_cells"]) for r in rows.values())
    alone = []
    for src in ("a.tif", "b.tif"):
        o = tmp_path / f"alone_{src}"
        assert main(["score", str(good_slides / src), "--out", str(o), *SCORE_ARGS]) == 0
        alone.append(int(_read_csv(o / "summary.csv")[0]["n_cells"]))
    assert counts == sorted(alone)
    # every folder finished, each of one of the files; the claims gave way to the markers
    sources = {json.loads((out / name / COMPLETE_MARKER).read_text())["source"]["path"] for name in rows}
    assert sources == {str((tmp_path / d / "s.tif").resolve()) for d in ("X", "Y")}
    assert not list(out.glob("*/.ihcscore-source.json"))


def test_broken_link_is_a_failure_not_a_missing_slide(good_slides, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    os.link(good_slides / "a.tif", d / "a.tif")
    os.symlink(tmp_path / "unmounted" / "slide7.svs", d / "slide7.svs")
    out = tmp_path / "out"
    assert main(["score", str(d), "--out", str(out), *SCORE_ARGS]) == 1
    (fail,) = _read_csv(out / "failures.csv")
    assert fail["slide"] == "slide7" and "slide7.svs" in fail["error"]
    assert {r["slide"]: r["status"] for r in _read_csv(out / "summary.csv")} == {"a": "ok", "slide7": "failed"}
    assert not (out / "slide7").exists()


def test_tables_saved_by_a_spreadsheet(good_slides, tmp_path, capsys):
    """summary.csv re-saved with a byte-order mark merges as before; in another encoding it is one line,
    before any slide is scored."""
    out = tmp_path / "out"
    slide = str(good_slides / "a.tif")
    assert main(["score", slide, "--out", str(out), *SCORE_ARGS]) == 0
    table = out / "summary.csv"
    table.write_text(table.read_text(encoding="utf-8"), encoding="utf-8-sig")
    assert main(["score", slide, "--out", str(out), *SCORE_ARGS, "--no-resume"]) == 0
    rows = _read_csv(table)
    assert [r["slide"] for r in rows] == ["a"] and list(rows[0])[0] == "slide"
    table.write_bytes("slide,status,n_cells\nGr\xf6\xdfe,ok,1\n".encode("cp1252"))
    capsys.readouterr()
    assert main(["score", slide, "--out", str(out), *SCORE_ARGS, "--no-resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.csv" in err and "UTF-8" in err


def _without_root_powers(cmd):
    """``cmd`` run so that file modes bind it: as root, without the capabilities that let root read and write
    anything (skipped where setpriv is missing)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_slide(good_slides, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cmd = _without_root_powers([sys.executable, "-m", "ihcscore.cli", "score", str(good_slides / "a.tif"),
                                "--out", str(ro), *SCORE_ARGS])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        ro.chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: --out {ro}: cannot write in the output folder "
                                             "(Permission denied)"], r.stderr
    assert list(ro.iterdir()) == []


def test_an_unreadable_slide_fails_alone(good_slides, tmp_path):
    """A slide this user may not read (chmod 000) is a failed slide; the others are scored (reading it for the
    resume digest stopped the whole batch before any slide)."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(good_slides / "a.tif", d / "a.tif")
    shutil.copy(good_slides / "b.tif", d / "noread.tif")
    (d / "noread.tif").chmod(0)
    out = tmp_path / "out"
    cmd = _without_root_powers([sys.executable, "-m", "ihcscore.cli", "score", str(d), "--out", str(out), *SCORE_ARGS])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        (d / "noread.tif").chmod(0o644)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert {x["slide"]: x["status"] for x in _read_csv(out / "summary.csv")} == {"a": "ok", "noread": "failed"}
    (fail,) = _read_csv(out / "failures.csv")
    assert "noread.tif" in fail["error"] and "ermission denied" in fail["error"]


def test_copies_and_numbered_folders_keep_their_own(good_slides, tmp_path):
    """Two copies of one file (a/x.tif scored before, b/x.tif now) get two folders (both were given x/); slides
    named alike down to their folder and file names are numbered, and keep their numbers when one folder goes."""
    from ihcscore.batch import output_names

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(good_slides / "a.tif", tmp_path / d / "x.tif")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "a"), "--out", str(out), *SCORE_ARGS]) == 0
    a, b = tmp_path / "a" / "x.tif", tmp_path / "b" / "x.tif"
    assert output_names([b, a], out) == ["b_x", "x"]  # the copy at the recorded path keeps x/
    assert main(["score", str(b), str(a), "--out", str(out), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"x", "b_x"} and rows["x"]["resumed"] == "True" and rows["b_x"]["resumed"] == "False"

    # g1/dd/y.tif, g2/dd/y.tif, g3/dd/y.tif: dd_y.tif, dd_y.tif-2, dd_y.tif-3
    slides = []
    for k, src in enumerate(("a.tif", "b.tif", "a.tif"), start=1):
        p = tmp_path / f"g{k}" / "dd" / "y.tif"
        p.parent.mkdir(parents=True)
        shutil.copy(good_slides / src, p)
        if k == 3:
            with open(p, "ab") as f:
                f.write(b"\0")  # another file than g1's
        slides.append(p)
    many = tmp_path / "many"
    assert main(["score", *map(str, slides), "--out", str(many), *SCORE_ARGS]) == 0
    assert output_names(slides, many) == ["dd_y.tif", "dd_y.tif-2", "dd_y.tif-3"]
    shutil.rmtree(many / "dd_y.tif-2")  # its outputs gone: the third slide keeps -3
    assert output_names(slides, many) == ["dd_y.tif", "dd_y.tif-2", "dd_y.tif-3"]
    assert output_names(slides[2:], many) == ["dd_y.tif-3"]
    assert not list(many.glob("*/.ihcscore-source.json")) and not list(out.glob("*/.ihcscore-source.json"))


def test_a_slide_that_changes_while_scored_fails_and_is_scored_again(good_slides, tmp_path):
    """A file still being written (a scanner, a copy) when its tiles are read: its outputs would be recorded as
    the finished file's, and a rerun would keep them."""
    from ihcscore.batch import score_batch
    from ihcscore.preset import load_preset

    slide = tmp_path / "s.tif"
    shutil.copy(good_slides / "a.tif", slide)
    out = tmp_path / "out"
    state = {"done": False}

    def replace_once(done, total):
        if done >= 1 and not state["done"]:
            state["done"] = True
            shutil.copy(good_slides / "b.tif", slide)

    res = score_batch([slide], out, load_preset("cxcr4"), tissue="all", tile_size=256, report=False,
                      on_tile=replace_once)
    (fail,) = res.failures
    assert "changed while it was scored" in fail["error"] and not (out / "s" / COMPLETE_MARKER).exists()
    assert not (out / "s").exists()  # nothing written, the claim released
    assert main(["score", str(slide), "--out", str(out), *SCORE_ARGS]) == 0
    alone = tmp_path / "alone"
    assert main(["score", str(good_slides / "b.tif"), "--out", str(alone), *SCORE_ARGS]) == 0
    assert _summary(out / "s") | {"slide": "b"} == _summary(alone / "b")


def test_a_claim_left_by_a_killed_run_does_not_hold_the_folder(good_slides, tmp_path):
    from ihcscore.export import claim_folder, recorded_source, slide_source

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    claim_folder(tmp_path / "x", slide_source(good_slides / "a.tif"))
    assert recorded_source(tmp_path / "x")["file"] == "a.tif"  # this process's: held
    claim = json.loads((tmp_path / "x" / ".ihcscore-source.json").read_text())
    claim["claimed_by"]["pid"] = dead
    (tmp_path / "x" / ".ihcscore-source.json").write_text(json.dumps(claim))
    assert recorded_source(tmp_path / "x") is None


def _scored_a_x_and_b_x(good_slides, tmp_path):
    """a/x.tif and b/x.tif (two different slides) scored in one run into tmp_path/out (a_x/, b_x/)."""
    for d, src in (("a", "a.tif"), ("b", "b.tif")):
        (tmp_path / d).mkdir()
        shutil.copy(good_slides / src, tmp_path / d / "x.tif")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), *SCORE_ARGS]) == 0
    return out


def test_moved_linked_and_hard_linked_slides_find_their_folders(good_slides, tmp_path):
    """A slide moved to another folder resumes in its folder-qualified folder (it was rescored beside it), and a
    re-export at its new place is then rescored there; links are named by the folder they are in; one file
    under two hard-linked names is one slide."""
    from ihcscore.batch import output_names

    out = _scored_a_x_and_b_x(good_slides, tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "b" / "x.tif").rename(tmp_path / "c" / "x.tif")
    moved = tmp_path / "c" / "x.tif"
    assert main(["score", str(moved), "--out", str(out), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"a_x", "b_x"} and rows["b_x"]["resumed"] == "True"
    assert json.loads((out / "b_x" / COMPLETE_MARKER).read_text())["source"]["path"] == str(moved.resolve())
    shutil.copy(good_slides / "a.tif", moved)  # re-exported where it now is: scored again in its folder
    assert output_names([moved], out) == ["b_x"]

    links = tmp_path / "links"
    for d, target in (("l", good_slides / "a.tif"), ("m", good_slides / "b.tif")):
        (links / d).mkdir(parents=True)
        os.symlink(target, links / d / "y.tif")
    assert output_names([links / "l" / "y.tif", links / "m" / "y.tif"]) == ["l_y", "m_y"]

    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(good_slides / "a.tif", hard / "one.tif")
    os.link(good_slides / "a.tif", hard / "two.tif")
    assert main(["score", str(hard), "--out", str(tmp_path / "hard_out"), *SCORE_ARGS]) == 0
    assert len(_read_csv(tmp_path / "hard_out" / "summary.csv")) == 1


def test_a_run_never_releases_another_runs_claim_and_keeps_its_own_while_rewriting(good_slides, tmp_path,
                                                                                monkeypatch):
    """Run 2 stopping released run 1's live claim, and a rescore (--no-resume) left its folder unclaimed while
    the marker was gone: a third run with another file of that name took the folder and the outputs mixed."""
    import ihcscore.export as export
    from ihcscore.batch import score_batch
    from ihcscore.preset import load_preset

    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = {**export.slide_source(good_slides / "a.tif"),
                 "claimed_by": {**export._this_process(), "pid": other.pid}}
        (out / "x" / export.SOURCE_CLAIM).write_text(json.dumps(claim))
        assert export.claim_folder(out / "x", export.slide_source(good_slides / "b.tif")) is False
        export.release_folder(out / "x")
        assert export.recorded_source(out / "x")["file"] == "a.tif"  # still run 1's
    finally:
        other.kill()
        other.wait()
    assert export.recorded_source(out / "x") is None  # its run is gone: the claim holds nothing

    slide = tmp_path / "in" / "x.tif"
    slide.parent.mkdir()
    shutil.copy(good_slides / "a.tif", slide)
    preset = load_preset("cxcr4")
    assert score_batch([slide], out, preset, tissue="all", tile_size=256, report=False).ok
    seen = []
    write = export.write_cells_parquet

    def watching(path, cells):  # mid-rewrite, the old marker gone: the folder must still be this slide's
        seen.append(export.recorded_source(Path(path).parent))
        return write(path, cells)

    monkeypatch.setattr(export, "write_cells_parquet", watching)
    assert score_batch([slide], out, preset, tissue="all", tile_size=256, report=False, resume=False).ok
    assert len(seen) == 1 and seen[0] is not None and seen[0]["path"] == str(slide.resolve())
    assert not (out / "x" / export.SOURCE_CLAIM).exists()


def test_report_fields_start_where_their_pixels_do(tmp_path):
    """A field read from a pyramid level starts at a whole level pixel: its origin said x0 = 603 while the pixels
    came from 602, and the overlays were drawn half a field pixel off."""
    import numpy as np

    from ihcscore.batch import _report_fields
    from ihcscore.slide import open_slide

    path = tmp_path / "s.tif"
    make_synthetic_slide(path, shape=(2048, 2048), mpp=0.2485, seed=3)  # fields of 603 px, level 1 at 2x
    with open_slide(path) as s:
        full = s.read_region((0, 0), 0, s.dimensions).astype(float)
        cells = pd.DataFrame({"x_px": [700.0, 1300.0, 700.0], "y_px": [700.0, 700.0, 1300.0]})
        fields = _report_fields(s, cells, 0.5 / s.mpp)
    assert len(fields) == 3
    for f in fields:
        (ox, oy), d, rgb = f["origin_px"], f["downsample"], f["rgb"].astype(float)
        assert d == 2.0
        n = rgb.shape[0]

        def mismatch(dx, dy):  # the field against the level-0 pixels it should average, shifted by (dx, dy)
            x0, y0 = int(ox) + dx, int(oy) + dy
            return np.abs(full[y0:y0 + 2 * n, x0:x0 + 2 * n].reshape(n, 2, n, 2, 3).mean(axis=(1, 3)) - rgb).mean()

        at = mismatch(0, 0)
        assert all(at < 0.8 * mismatch(dx, dy) for dx, dy in ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)))


def test_a_copied_slide_resumes_and_calls_in_one_process_keep_their_claims(good_slides, tmp_path, monkeypatch):
    """A cohort copied to scratch (the originals still in place) resumes in its folders, not a second row each;
    `..` in a path names the folder it means; a second score_batch call in the same process that stops early
    releases only its own claims."""
    from ihcscore.batch import output_names, score_batch
    from ihcscore.export import recorded_source
    from ihcscore.preset import load_preset

    out = _scored_a_x_and_b_x(good_slides, tmp_path)
    (tmp_path / "scratch").mkdir()
    shutil.copy(tmp_path / "b" / "x.tif", tmp_path / "scratch" / "x.tif")
    assert main(["score", str(tmp_path / "scratch" / "x.tif"), "--out", str(out), *SCORE_ARGS]) == 0
    rows = {r["slide"]: r for r in _read_csv(out / "summary.csv")}
    assert set(rows) == {"a_x", "b_x"} and rows["b_x"]["resumed"] == "True"

    monkeypatch.chdir(tmp_path / "a")
    assert output_names([Path("../b/x.tif"), Path("x.tif")]) == ["b_x", "a_x"]

    preset = load_preset("cxcr4")
    seen = []

    def second_call(done, total):
        if done == 1 and not seen:
            with pytest.raises(Exception):
                score_batch([good_slides / "b.tif"], out2, preset, tissue="all", tile_size=256, report=False,
                            classifier=tmp_path / "missing.skops")
            seen.append(recorded_source(out2 / "a"))  # the first call's claim, still there

    out2 = tmp_path / "out2"
    assert score_batch([good_slides / "a.tif"], out2, preset, tissue="all", tile_size=256, report=False,
                       on_tile=second_call).ok
    assert seen and seen[0] is not None and seen[0]["file"] == "a.tif"


def test_a_file_keeps_one_row_when_the_batch_names_it_otherwise(good_slides, tmp_path):
    """x.svs failed as `x`; scored again beside a new x.tif it is named `a_x.svs`: its old failed row went
    unnoticed beside the new one (two rows, two failures, for one file)."""
    d = tmp_path / "a"
    d.mkdir()
    (d / "x.svs").write_text("not a slide\n")
    out = tmp_path / "out"
    assert main(["score", str(d), "--out", str(out), *SCORE_ARGS]) == 1
    assert [r["slide"] for r in _read_csv(out / "failures.csv")] == ["x"]
    shutil.copy(good_slides / "a.tif", d / "x.tif")
    assert main(["score", str(d), "--out", str(out), *SCORE_ARGS]) == 1
    rows = {r["slide"]: r["status"] for r in _read_csv(out / "summary.csv")}
    assert rows == {"a_x.svs": "failed", "a_x.tif": "ok"}
    assert [r["slide"] for r in _read_csv(out / "failures.csv")] == ["a_x.svs"]


def test_a_rerun_that_only_resumes_rewrites_the_tables_once(folder, tmp_path, monkeypatch):
    """Every resumed slide rewrote summary.csv, failures.csv and index.html: quadratic in a large cohort."""
    import ihcscore.batch as batch

    out = tmp_path / "out"
    good = tmp_path / "good"
    good.mkdir()
    for name in ("a.tif", "b.tif"):
        shutil.copy(folder / name, good / name)
    assert main(["score", str(good), "--out", str(out), *SCORE_ARGS]) == 0
    before = _read_csv(out / "summary.csv")
    writes = []
    real = batch.update_folder_tables
    monkeypatch.setattr(batch, "update_folder_tables", lambda *a, **k: writes.append(1) or real(*a, **k))
    assert main(["score", str(good), "--out", str(out), *SCORE_ARGS]) == 0
    assert len(writes) == 1
    after = _read_csv(out / "summary.csv")
    assert [r["slide"] for r in after] == [r["slide"] for r in before] and all(r["resumed"] == "True" for r in after)
