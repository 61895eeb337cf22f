"""Whole-slide benchmark: end-to-end speed, peak memory, tile-decode rate and the naive pipeline, in one run.

    .venv/bin/python benchmarks/bench_slide.py --size 16384            # 16384 x 16384 px at 0.5 µm/px
    .venv/bin/python benchmarks/bench_slide.py --size 40000 --workers 4
    .venv/bin/python benchmarks/bench_slide.py --mpp 0.25 --level-downsample 4   # a 40x scan, Aperio pyramid

The slide is scanned at ``--mpp`` and scored at the preset's detection pixel size (0.5 µm/px): at 0.25
µm/px (a 40x scan) with ``--level-downsample 4`` (levels 1, 4, 16 as Aperio stores them) every tile
is read from level 0 and resampled 2x, as for a real SVS. The synthetic slide is generated on demand (``ihcscore.synthetic.write_large_synthetic_slide``,
block by block, bounded memory) into ``--out`` (default ``benchmarks/out/``, not committed) and reused
by later runs. Then, each measured in this run on this machine:

* **end to end**: ``ihcscore.pipeline.analyze_slide`` (tissue detection, tiles with overlap, detection,
  measurement, classification, scoring) in a child process; slide megapixels (level 0) per second and per
  core (worker), and the peak resident memory of the scoring process tree (sampled sum of the process and
  its workers with psutil, and the largest single process from ``getrusage``);
* **raw tile decode**: every level-0 tile of the file decoded with tifffile, one core: the ceiling for any
  pipeline that reads level 0 once;
* **naive scikit-image pipeline** (rgb2hed, Otsu, distance-transform watershed, regionprops: what one writes
  first) on a 4096 x 4096 crop of the same slide, one core, held in memory;
* **the same detection in scikit-image / scipy**: ``analyze_region`` on a 2048 x 2048 crop, one thread,
  with ihcscore's compiled kernels switched off (every step then runs as the scipy / scikit-image call
  it replaces: the QuPath-style detection, four compartments, written with those libraries), and with them
  on, on the same crop (skip both with ``--skip-same-algorithm``);
* **GPU** (``ihcscore.gpu``, CuPy), when one is present: the deconvolution + Gaussian rate on a 4096 x 4096
  crop against the CPU's, and the slide scored end to end a second time with ``gpu=True`` (same workers;
  skip with ``--skip-gpu-slide``), with its cell count and H-scores beside the CPU run's.

and the ratios between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import naive_pipeline, set_kernels  # noqa: E402  (the same baseline as the engine benchmark)


def _rss_tree(proc) -> int:
    """Resident bytes of a process and all its descendants (psutil)."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakSampler:
    """Samples the summed RSS of a process tree every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_tree(self.proc))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ----------------------------------------------------------------------------- child: score the slide
def _score_child(args) -> None:
    """Runs in a child process so its peak RSS is the scoring's alone; prints one JSON line."""
    import resource

    from ihcscore.pipeline import analyze_slide
    from ihcscore.preset import load_preset
    from ihcscore.slide import open_slide

    preset = load_preset(args.preset)
    ticks = []
    with PeakSampler(os.getpid()) as sampler, open_slide(args.slide) as slide:
        t0 = time.perf_counter()
        res = analyze_slide(slide, preset, tile_size=args.tile_size, workers=args.workers, tissue=args.tissue,
                            polygons=args.polygons, progress=lambda d, n: ticks.append((d, n)), gpu=args.gpu)
        dt = time.perf_counter() - t0
        dims = slide.dimensions
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tile workers, reaped when the pool closed
    self_kb, child_kb = ru_self.ru_maxrss, ru_kids.ru_maxrss
    cpu_s = ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime
    print(json.dumps({
        "seconds": dt, "cpu_seconds": cpu_s, "n_cells": int(len(res.cells)), "n_tiles": int(res.summary["n_tiles"]),
        "h_score": res.summary["all"]["h_score"], "tumour_h_score": res.summary["tumour"]["h_score"],
        "width": dims[0], "height": dims[1], "device": res.summary["device"],
        "peak_rss_tree_bytes": sampler.peak, "maxrss_self_bytes": self_kb * 1024,
        "maxrss_largest_child_bytes": child_kb * 1024,
        "cells_table_bytes": int(res.cells.memory_usage(deep=True).sum()),
    }), flush=True)


# ----------------------------------------------------------------------------- measurements
def ensure_slide(size: int, mpp: float, out: Path, workers: int, level_downsample: int = 2) -> Path:
    from ihcscore.synthetic import write_large_synthetic_slide

    out.mkdir(parents=True, exist_ok=True)
    # no dot before the extension: the truth files are named after the part before the first dot
    name = f"synthetic_{size}_{mpp:g}um".replace(".", "p") + ("" if level_downsample == 2 else f"_L{level_downsample}")
    path = out / f"{name}.tif"
    if path.is_file() and path.with_name(path.name.split(".")[0] + ".truth.json").is_file():
        print(f"slide: {path} (reused)", flush=True)
        return path
    print(f"generating {path} ({size} x {size} px, {mpp} µm/px, levels {level_downsample}x apart) ...", flush=True)
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            print(f"  blocks {done}/{total}", flush=True)

    write_large_synthetic_slide(path, shape=(size, size), mpp=mpp, seed=0, workers=workers, progress=progress,
                                level_downsample=level_downsample)
    print(f"  generated in {time.perf_counter() - t0:.0f} s, {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    return path


def decode_rate(path: Path, max_seconds: float = 120.0):
    """Decode level-0 tiles with tifffile (one core); every tile unless that takes longer than max_seconds."""
    import tifffile

    from ihcscore.slide import _ensure_tifffile_jpeg

    _ensure_tifffile_jpeg()
    with tifffile.TiffFile(str(path)) as tf:
        page = tf.pages[0]
        n_total = len(page.dataoffsets)
        fh = tf.filehandle
        px = 0
        n = 0
        t0 = time.perf_counter()
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            fh.seek(offset)
            data = fh.read(count)
            tile, _, shape = page.decode(data, n, jpegtables=page.jpegtables)
            px += int(np.prod(tile.shape[1:3]))
            n += 1
            if time.perf_counter() - t0 > max_seconds:
                break
        dt = time.perf_counter() - t0
    return {"tiles": n, "tiles_total": n_total, "seconds": dt, "mp_per_s": px / 1e6 / dt}


def read_region_rate(path: Path, side: int = 4096, block: int = 1024):
    """slide.read_region in 1024-px blocks over a level-0 square (one core; includes the slide reader)."""
    from ihcscore.slide import open_slide

    with open_slide(path) as s:
        w, h = s.dimensions
        x0, y0 = max(0, (w - side) // 2), max(0, (h - side) // 2)
        t0 = time.perf_counter()
        for y in range(y0, y0 + side, block):
            for x in range(x0, x0 + side, block):
                s.read_region((x, y), 0, (block, block))
        dt = time.perf_counter() - t0
    return {"seconds": dt, "mp_per_s": side * side / 1e6 / dt}


def central_crop(path: Path, side: int):
    """The slide's central ``side``² level-0 square (smaller if the slide is): ``(rgb, side, mpp)``."""
    from ihcscore.slide import open_slide

    with open_slide(path) as s:
        w, h = s.dimensions
        side = min(side, w, h)
        return s.read_region(((w - side) // 2, (h - side) // 2), 0, (side, side)), side, float(s.mpp)


def naive_rate(path: Path, side: int = 4096):
    rgb, side, _ = central_crop(path, side)
    t0, c0 = time.perf_counter(), time.process_time()
    n, _ = naive_pipeline(rgb)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"side": side, "seconds": dt, "cpu_seconds": cpu, "mp_per_s": side * side / 1e6 / dt,
            "mp_per_s_cpu": side * side / 1e6 / cpu, "objects": n}


def same_algorithm_rate(path: Path, preset_name: str, side: int = 2048):
    """analyze_region on one level-0 crop, one thread: scipy / scikit-image calls, then ihcscore's kernels."""
    from ihcscore.pipeline import analyze_region
    from ihcscore.preset import load_preset

    rgb, side, mpp = central_crop(path, side)
    preset = load_preset(preset_name)
    out = {"side": side}
    for name, on in (("skimage", False), ("kernels", True)):
        set_kernels(on)
        analyze_region(rgb[:256, :256], mpp, preset, threads=1)  # warm-up (kernel cache, imports)
        t0, c0 = time.perf_counter(), time.process_time()
        n = len(analyze_region(rgb, mpp, preset, threads=1).cells)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[name] = {"seconds": dt, "cpu_seconds": cpu, "mp_per_s": side * side / 1e6 / dt,
                     "mp_per_s_cpu": side * side / 1e6 / cpu, "cells": n}
    set_kernels(True)
    return out


def gpu_rate(path: Path, side: int = 4096):
    from ihcscore import gpu

    if not gpu.available():
        return None
    from ihcscore.stains import H_DAB_DEFAULT

    rgb, side, _ = central_crop(path, side)
    gpu.deconvolve_smooth(rgb, H_DAB_DEFAULT, sigma_px=3.0)  # warm-up (kernels, transfer)
    t0 = time.perf_counter()
    gpu.deconvolve_smooth(rgb, H_DAB_DEFAULT, sigma_px=3.0)
    dt_gpu = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpu.deconvolve_smooth_cpu(rgb, H_DAB_DEFAULT, sigma_px=3.0)
    dt_cpu = time.perf_counter() - t0
    return {"side": side, "gpu_mp_per_s": side * side / 1e6 / dt_gpu, "cpu_mp_per_s": side * side / 1e6 / dt_cpu,
            "device": gpu.device_name()}


def _run_child(cmd):
    """Run the scoring child; its JSON line, or None (its output printed) when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="slide side in pixels (level 0)")
    ap.add_argument("--mpp", type=float, default=0.5, help="slide pixel size, µm/px (default 0.5; 0.25 = a 40x scan)")
    ap.add_argument("--level-downsample", type=int, default=2, choices=(2, 4),
                    help="downsample between the slide's pyramid levels (4: Aperio's 1, 4, 16)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tile worker processes")
    ap.add_argument("--tile-size", type=int, default=1024, help="tile side at the detection resolution, px")
    ap.add_argument("--tissue", default="auto", help="auto | all")
    ap.add_argument("--preset", default="cxcr4")
    ap.add_argument("--polygons", action="store_true",
                    help="also keep nucleus/cell outlines (what `ihcscore score` does for cells.geojson)")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="where the generated slide is kept")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-same-algorithm", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    ap.add_argument("--skip-gpu-slide", action="store_true",
                    help="with a GPU, do not score the slide a second time with gpu=True")
    ap.add_argument("--_score", dest="score_slide", help=argparse.SUPPRESS)
    ap.add_argument("--_gpu", dest="gpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from ihcscore.runtime import retain_freed_memory

    if not args.score_slide or args.workers <= 1:
        retain_freed_memory()  # as `ihcscore score --workers 1` does; the naive baseline gets it too
    if args.score_slide:
        args.slide = args.score_slide
        _score_child(args)
        return 0

    cores = max(1, args.workers)
    print(f"ihcscore slide benchmark: {args.size} x {args.size} px at {args.mpp} µm/px (levels {args.level_downsample}x "
          f"apart), {args.workers} worker(s), "
          f"tile {args.tile_size} px, tissue={args.tissue}, {os.cpu_count()} CPU(s) on this machine", flush=True)
    path = ensure_slide(args.size, args.mpp, args.out, max(1, args.workers), args.level_downsample)

    dec = decode_rate(path)
    print(f"raw tile decode (tifffile, 1 core):  {dec['mp_per_s']:8.1f} MP/s  "
          f"({dec['tiles']}/{dec['tiles_total']} level-0 tiles in {dec['seconds']:.1f} s)", flush=True)
    rr = read_region_rate(path)
    print(f"slide.read_region (1 core):          {rr['mp_per_s']:8.1f} MP/s  (4096² in 1024² blocks)", flush=True)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_score", str(path), "--workers", str(args.workers),
           "--tile-size", str(args.tile_size), "--tissue", args.tissue, "--preset", args.preset]
    if args.polygons:
        cmd.append("--polygons")
    print("scoring (child process) ...", flush=True)
    e2e = _run_child(cmd)
    if e2e is None:
        return 1
    mp = e2e["width"] * e2e["height"] / 1e6
    rate = mp / e2e["seconds"]
    print(f"end to end (analyze_slide):          {rate:8.2f} MP/s  = {rate / cores:.2f} MP/s per core  "
          f"({mp:.0f} MP in {e2e['seconds']:.1f} s wall; {e2e['n_tiles']} tissue tiles, {e2e['n_cells']} cells, "
          f"H-score {e2e['h_score']:.1f})", flush=True)
    cpu_rate = mp / e2e["cpu_seconds"]
    print(f"  per CPU-second (user+sys of the process tree, {e2e['cpu_seconds']:.0f} s): {cpu_rate:.2f} MP/s "
          f"(insensitive to other load on a shared machine; wall/worker assumes {cores} free cores)", flush=True)
    gib = 2**30
    print(f"peak RSS, scoring process tree:      {e2e['peak_rss_tree_bytes'] / gib:8.2f} GiB (sampled sum; target < 2)"
          f"\n  largest single process (getrusage): main {e2e['maxrss_self_bytes'] / gib:.2f} GiB, "
          f"worker {e2e['maxrss_largest_child_bytes'] / gib:.2f} GiB; cell table {e2e['cells_table_bytes'] / gib:.2f} GiB",
          flush=True)

    nav = None
    if not args.skip_naive:
        nav = naive_rate(path)
        print(f"naive scikit-image ({nav['side']}² crop, 1 core): {nav['mp_per_s']:6.2f} MP/s  "
              f"({nav['objects']} objects in {nav['seconds']:.1f} s)", flush=True)
    same = None
    if not args.skip_same_algorithm:
        same = same_algorithm_rate(path, args.preset)
        sk, kn = same["skimage"], same["kernels"]
        print(f"same detection, scipy/scikit-image ({same['side']}² crop, 1 thread): {sk['mp_per_s']:6.2f} MP/s  "
              f"({sk['cells']} cells in {sk['seconds']:.1f} s); with ihcscore's kernels: {kn['mp_per_s']:.2f} MP/s "
              f"({kn['cells']} cells)", flush=True)
    g = gpu_rate(path)
    if g:
        print(f"GPU deconvolution + Gaussian ({g['device']}): {g['gpu_mp_per_s']:.1f} MP/s vs CPU "
              f"{g['cpu_mp_per_s']:.1f} MP/s ({g['gpu_mp_per_s'] / g['cpu_mp_per_s']:.1f}x)", flush=True)
        if not args.skip_gpu_slide:
            print("scoring with gpu=True (child process) ...", flush=True)
            e2e_gpu = _run_child(cmd + ["--_gpu"])
            if e2e_gpu is None:
                return 1
            g["end_to_end"] = e2e_gpu
            g_rate = mp / e2e_gpu["seconds"]
            print(f"end to end with gpu=True:            {g_rate:8.2f} MP/s  ({e2e_gpu['seconds']:.1f} s wall, "
                  f"{e2e_gpu['n_cells']} cells vs {e2e['n_cells']} on the CPU, H-score {e2e_gpu['h_score']:.2f} vs "
                  f"{e2e['h_score']:.2f}, tumour {e2e_gpu['tumour_h_score']:.2f} vs {e2e['tumour_h_score']:.2f}; "
                  f"peak RSS {e2e_gpu['peak_rss_tree_bytes'] / 2**30:.2f} GiB): {g_rate / rate:.2f}x the CPU run",
                  flush=True)
    else:
        print("GPU: none (CuPy or a CUDA device missing); GPU rate not measured", flush=True)

    print("ratios (same run, same machine):")
    per_core = rate / cores
    if nav:
        print(f"  ihcscore per core (wall) / naive scikit-image (1 core): {per_core / nav['mp_per_s']:.2f}x")
        print(f"  ihcscore per CPU-second / naive scikit-image (CPU-second): "
              f"{cpu_rate / nav['mp_per_s_cpu']:.2f}x")
    if same:
        sk = same["skimage"]
        print(f"  ihcscore per core (wall) / same detection in scipy/scikit-image (1 thread): "
              f"{per_core / sk['mp_per_s']:.1f}x (per CPU-second: {cpu_rate / sk['mp_per_s_cpu']:.1f}x)")
    print(f"  ihcscore per core / raw tile decode (1 core):    {per_core / dec['mp_per_s']:.3f} "
          f"(decode is {dec['mp_per_s'] / per_core:.0f}x faster than scoring)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "decode": dec,
                                         "read_region": rr, "end_to_end": e2e, "naive": nav,
                                         "same_algorithm": same, "gpu": g}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
