"""Engine speed vs a naive scikit-image pipeline, measured in one run on the same image.

    ./run bench                    # 4096 x 4096 synthetic region (default)
    ./run bench --size 2048        # quicker

Prints megapixels per second of ``ihcscore.pipeline.analyze_region`` and of a
plain scikit-image pipeline (rgb2hed, Otsu, distance-transform watershed,
regionprops) on the same synthetic H-DAB image, and their ratio: once with the
engine on one thread (per core) and once with its default threads (row bands
segmented side by side, ``ihcscore.cells.segment_in_bands``; identical results).
Both pipelines run in this one process after ``ihcscore.runtime.retain_freed_memory``
(what ``ihcscore score`` does); ``--malloc default`` leaves the
allocator alone.

The engine's numba kernels (``ihcscore.kernels``) are compiled, or loaded from
numba's cache, before timing; that one-off cost is printed on its own line.
``--kernels off`` times the pure scipy/scikit-image path for comparison.
Timings are the best of ``--repeats`` runs (wall clock; CPU seconds alongside,
which are less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from scipy import ndimage as ndi
from skimage import color, feature, filters, measure, segmentation

from ihcscore.pipeline import analyze_region
from ihcscore.preset import load_preset
from ihcscore.runtime import default_threads, retain_freed_memory
from ihcscore.synthetic import make_synthetic_region


def naive_pipeline(rgb: np.ndarray, thresholds=(0.2, 0.4, 0.6)):
    """What a scikit-image user writes first: rgb2hed, Otsu, watershed, regionprops."""
    hed = color.rgb2hed(rgb)
    h, d = hed[..., 0], hed[..., 2]
    mask = h > filters.threshold_otsu(h)
    dist = ndi.distance_transform_edt(mask)
    peaks = feature.peak_local_max(dist, min_distance=5, labels=measure.label(mask))
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-dist, markers, mask=mask)
    props = measure.regionprops(labels, intensity_image=d)
    dab = np.array([p.intensity_mean for p in props])
    bins = np.digitize(dab, thresholds)
    return len(props), bins


def best_of(fn, repeats):
    """Best wall time, best CPU time and the last result of ``repeats`` calls.

    CPU time is user + system; the system part (page faults of large fresh arrays, which
    grows faster than the image on a busy machine) is kept in ``best_of.sys``.
    """
    times, cpus, syss = [], [], []
    out = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        out = fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        syss.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
    best_of.sys = syss[cpus.index(min(cpus))]
    return min(times), min(cpus), out


def set_kernels(on: bool):
    """Switch the engine between its numba kernels and the scipy/skimage fallback."""
    import ihcscore.cells as cells
    import ihcscore.measure as measure
    import ihcscore.pipeline as pipeline
    from ihcscore import kernels
    cells._k = kernels if on else None
    measure._k = kernels if on else None
    pipeline._k = kernels if on else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="image side in pixels (0.5 µm/px)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per pipeline; the best counts (the first runs also grow the heap)")
    ap.add_argument("--kernels", choices=("on", "off"), default="on",
                    help="numba kernels (default) or the pure scipy/scikit-image path")
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: all CPUs)")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="reuse freed buffers (as the CLI does) or glibc's default allocator settings")
    args = ap.parse_args(argv)
    if args.malloc == "retain":
        retain_freed_memory()
    threads = args.threads or default_threads()

    print(f"generating a {args.size} x {args.size} synthetic H-DAB region (0.5 µm/px) ...", flush=True)
    rgb, truth, _ = make_synthetic_region((args.size, args.size), 0.5, seed=0)
    mp = args.size * args.size / 1e6
    preset = load_preset("cxcr4")
    set_kernels(args.kernels == "on")
    if args.kernels == "on":
        from ihcscore import kernels
        t_jit = kernels.warm_up()
        print(f"kernel compile/cache load: {t_jit:6.2f} s (once per process; not in the timings below)")
        analyze_region(rgb[:256, :256], 0.5, preset)  # first-call overheads outside the timing
    t_one, c_one, result = best_of(lambda: analyze_region(rgb, 0.5, preset, threads=1), args.repeats)
    s_one = best_of.sys
    if threads > 1:
        t_par, c_par, _ = best_of(lambda: analyze_region(rgb, 0.5, preset, threads=threads), args.repeats)
        s_par = best_of.sys
    t_naive, c_naive, (n_naive, _) = best_of(lambda: naive_pipeline(rgb), args.repeats)
    s_naive = best_of.sys
    print(f"cores available:          {os.cpu_count()} (engine threads: {threads}; allocator: {args.malloc})")
    print(f"image:                    {args.size} x {args.size} px = {mp:.1f} MP, {len(truth)} true cells")
    print(f"naive scikit-image:       {t_naive:7.2f} s  {mp / t_naive:6.2f} MP/s  (cpu {c_naive:.2f} s, sys {s_naive:.2f}; "
          f"{n_naive} objects, nucleus DAB mean only; one thread)")
    print(f"ihcscore, 1 thread:       {t_one:7.2f} s  {mp / t_one:6.2f} MP/s  (cpu {c_one:.2f} s, sys {s_one:.2f}; "
          f"{len(result.cells)} cells, 4 compartments x 2 stains measured, kernels {args.kernels})")
    if threads > 1:
        print(f"ihcscore, {threads} threads:      {t_par:7.2f} s  {mp / t_par:6.2f} MP/s  (cpu {c_par:.2f} s, sys {s_par:.2f})")
    print(f"speed ratio per core (ours 1 thread / naive):   {t_naive / t_one:.2f}x   (cpu time ratio {c_naive / c_one:.2f}x)")
    if threads > 1:
        print(f"speed ratio (ours {threads} threads / naive, wall clock): {t_naive / t_par:.2f}x")


if __name__ == "__main__":
    main()
