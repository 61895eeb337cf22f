"""The ``ihcscore`` command: ``score`` slides or folders, ``cohort`` analysis, ``presets``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from . import __version__

COMPARTMENT_CHOICES = ("nucleus", "cytoplasm", "membrane", "cell")


def _thresholds(text: str):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--thresholds takes 1 or 3 OD values like 0.2,0.4,0.6, got {text!r}")
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"--thresholds takes 1 or 3 OD values, got {len(values)}")
    return values


def _positive_float(text: str):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _pixel_size(text: str):
    """``--mpp``: checked against the range open_slide accepts, once, before any slide."""
    from .slide import PLAUSIBLE_MPP_UM

    v = _positive_float(text)
    lo, hi = PLAUSIBLE_MPP_UM
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"pixel size {text} µm/px is outside the accepted range {lo:g}–{hi:g} µm/px")
    return v


def _int_at_least(minimum: int):
    def parse(text: str):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return v
    return parse


def _add_score_parser(sub):
    p = sub.add_parser("score", help="score a slide or every slide in a folder",
                       description="Detect cells, measure DAB OD and report H-score, percent positive, Allred and "
                                   "IRS per slide. Writes DIR/<slide>/summary.json, cells.parquet, cells.geojson, "
                                   "report.html and DIR/summary.csv, DIR/failures.csv.")
    p.add_argument("input", metavar="SLIDE_OR_FOLDER", nargs="+",
                   help="slide files and/or folders of slides (each folder's slides, not its subfolders)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    p.add_argument("--preset", default="cxcr4", metavar="NAME|FILE.toml",
                   help="marker preset: a packaged name (see `ihcscore presets`) or a TOML file (default: cxcr4)")
    p.add_argument("--stains", default="default", metavar="default|auto|FILE.json",
                   help="stain vectors: the preset's (default), estimated per slide (auto), or a JSON file")
    p.add_argument("--mpp", type=_pixel_size, metavar="UM",
                   help="pixel size in µm/px for files that do not record it (overrides the file)")
    p.add_argument("--thresholds", type=_thresholds, metavar="T1[,T2,T3]",
                   help="DAB OD thresholds for 1+,2+,3+ (one value: positive/negative only)")
    p.add_argument("--compartment", choices=COMPARTMENT_CHOICES,
                   help="compartment whose DAB OD (the preset's statistic, mean or max) bins each cell "
                        "(others are reported too)")
    p.add_argument("--tissue", default="auto", metavar="auto|all|MASK.png|ANNOTATIONS.geojson",
                   help="where to score: detected tissue (auto), the whole image (all), a mask or QuPath annotations")
    p.add_argument("--tile-size", type=_int_at_least(1), default=1024, metavar="PX",
                   help="tile side in pixels at the detection resolution (results do not depend on it; "
                        "default 1024, at least 128)")
    p.add_argument("--workers", type=_int_at_least(1), default=1, metavar="N",
                   help="worker processes for tiles (default 1)")
    p.add_argument("--dask", metavar="ADDRESS|local",
                   help="run tiles on a dask.distributed scheduler at ADDRESS, or on a local cluster of --workers")
    p.add_argument("--classifier", metavar="MODEL.skops",
                   help="trained tumour/other cell classifier (`ihcscore train`); default: the morphology rule")
    p.add_argument("--csv", action="store_true", help="also write cells.csv")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-resume", action="store_true", help="rescore slides even when complete outputs exist")
    p.add_argument("--gpu", action="store_true",
                   help="colour deconvolution and detection smoothing on a CUDA GPU (the [gpu] extra, CuPy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables (errors still print)")
    p.set_defaults(func=run_score)


def _build_preset(args):
    from .preset import load_preset
    from .stains import StainVectors

    preset = load_preset(args.preset)
    kw = {}
    if args.thresholds is not None:
        kw["thresholds"] = args.thresholds
    if args.compartment is not None:
        kw["compartment"] = args.compartment
    stains = None
    if args.stains == "auto":
        kw["estimate_stains"] = True
    elif args.stains == "default":
        pass
    else:
        stains = StainVectors.from_json(args.stains)
        kw["stain_vectors"] = stains
    return (preset.replace(**kw) if kw else preset), stains


def _fmt(v, digits=1):
    if v is None or v == "":
        return "–"
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def _has_dashboard(address: str) -> bool:
    """A cluster's scheduler serves its dashboard (a local one only with bokeh installed here)."""
    import importlib.util

    return address != "local" or importlib.util.find_spec("bokeh") is not None


def _close_dask(client) -> None:
    """Close the client, and the LocalCluster of ``--dask local`` with it (``Client.close`` leaves it to
    the interpreter's exit, where workers still running cancelled tiles log warnings after our last line)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)  # shutting down: tiles cancelled on purpose
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def _file_key(path: Path):
    """One key per file however it is named: links, hard links, ``./a/x.svs`` and ``a/../a/x.svs`` alike."""
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:  # a broken link: by its own path (it fails when scored)
        return path.absolute()


def _check_writable(folder: Path) -> None:
    """``OSError`` in one line when files cannot be created in ``folder`` (before any slide is scored)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ihcscore-write-test-"):
            pass
    except OSError as e:
        raise OSError(f"--out {folder}: cannot write in the output folder ({e.strerror or e})") from None


def run_score(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .batch import DaskSetupError, dask_client, find_slides, score_batch
    from .export import read_csv_rows
    from .pipeline import MIN_TILE_PX

    console = Console(stderr=True, soft_wrap=True)  # errors print with --quiet too, one line each
    try:
        preset, stains = _build_preset(args)
        found = {}  # one entry per file, however it was named (a/x.svs, ./a/x.svs, the folder a)
        for item in args.input:
            for p in find_slides(item):
                found.setdefault(_file_key(p), p)
        if args.tile_size < MIN_TILE_PX:
            raise ValueError(f"--tile-size {args.tile_size}: tiles must be at least {MIN_TILE_PX} px")
        if args.tissue not in ("auto", "all"):
            if not Path(args.tissue).is_file():
                raise FileNotFoundError(f"--tissue {args.tissue}: no such mask or annotation file")
            found.pop(_file_key(Path(args.tissue)), None)  # a mask.png beside the slides is not a slide
        paths = list(found.values())
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"--out {args.out}: cannot create the output folder ({e.strerror or e})") from e
        _check_writable(Path(args.out))
        for table in ("summary.csv", "failures.csv"):
            read_csv_rows(Path(args.out) / table)  # rows this run merges with: readable (ValueError says why)
        if args.classifier is not None:
            from .classify import CellClassifier

            model = CellClassifier.load(args.classifier)  # fail early, before any slide
            differ = model.detection_differences(dataclasses.asdict(preset.detection))
            if differ:
                raise ValueError(f"--classifier {args.classifier}: trained on cells detected with other settings "
                                 f"({', '.join(differ)} differ from preset {preset.name}'s); use the preset it was "
                                 "trained with, or train it again")
        if args.gpu and not args.dask:  # on a cluster the workers' devices count
            from . import gpu

            gpu.require()
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    if not paths:
        console.print(f"[red]error:[/red] {escape(' '.join(args.input))}: no slide files found", highlight=False)
        return 2
    try:
        client = dask_client(args.dask, args.workers) if args.dask else None
    except ImportError as e:
        console.print(f"[red]error:[/red] --dask needs dask.distributed ({escape(str(e))}): "
                      + escape("pip install 'ihcscore[distributed]'"), highlight=False)
        return 2
    except DaskSetupError as e:  # connected, but the cluster cannot score
        console.print(f"[red]error:[/red] --dask {escape(args.dask)}: {escape(str(e))}", highlight=False)
        return 2
    except Exception as e:  # noqa: BLE001 - whatever answered there, one line
        reason = ' '.join(str(e).split()) or type(e).__name__
        console.print(f"[red]error:[/red] --dask {escape(args.dask)}: cannot connect to the scheduler "
                      f"({escape(reason)})", highlight=False)
        return 2
    if client is not None and not args.quiet and _has_dashboard(args.dask):
        console.print(f"Dask dashboard: {escape(client.dashboard_link)}", highlight=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False, disable=args.quiet)
    with progress:
        overall = progress.add_task("all slides", total=len(paths))
        state = {}

        def on_slide_start(path, i, n):
            state["task"] = progress.add_task(f"  {Path(path).name}", total=None)

        def on_tile(done, total):
            progress.update(state["task"], completed=done, total=total)

        def on_slide_end(path, row):
            progress.update(overall, advance=1)
            progress.update(state["task"], visible=False)
            if row["status"] != "ok":
                progress.console.print(f"[red]failed:[/red] {escape(str(row.get('error')))}", highlight=False)

        try:
            result = score_batch(paths, args.out, preset, stains=stains, stains_spec=args.stains,
                                 tissue=args.tissue, mpp=args.mpp, tile_size=args.tile_size, workers=args.workers,
                                 client=client, csv=args.csv, report=not args.no_report,
                                 resume=not args.no_resume, on_slide_start=on_slide_start, on_tile=on_tile,
                                 on_slide_end=on_slide_end, classifier=args.classifier, gpu=args.gpu)
        finally:
            if client is not None:
                _close_dask(client)
    if not args.quiet:
        table = Table(title=f"ihcscore {__version__}: preset {preset.name}, headline {preset.scoring.measurement}, "
                            f"thresholds {list(preset.scoring.thresholds)} OD; H-score 0-300")
        for col in ("slide", "status", "cells", "tumour cells", "tumour H-score", "tumour % pos",
                    "tumour H nucleus", "H cytoplasm", "H membrane", "H cell", "all-cell H-score", "time s"):
            table.add_column(col, justify="left" if col in ("slide", "status") else "right")
        for r in result.rows:
            table.add_row(str(r["slide"]), str(r["status"]), _fmt(r.get("n_cells"), 0), _fmt(r.get("tumour_n"), 0),
                          _fmt(r.get("tumour_h_score")), _fmt(r.get("tumour_percent_positive")),
                          *(_fmt(r.get(f"tumour_h_score_{c}")) for c in COMPARTMENT_CHOICES),
                          _fmt(r.get("all_h_score")), _fmt(r.get("runtime_s")))
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)
        out.print(table)
        for r in result.rows:
            if r.get("warnings"):
                console.print(f"[yellow]warning:[/yellow] {escape(str(r['warnings']))}", highlight=False)
        console.print(f"results in {escape(str(Path(args.out).resolve()))}", highlight=False)
    if result.failures:
        console.print(f"[red]{len(result.failures)} of {len(paths)} slides failed[/red] "
                      f"(see {Path(args.out) / 'failures.csv'})", highlight=False)
        return 1
    return 0


def _add_train_parser(sub):
    p = sub.add_parser("train", help="train the tumour/other cell classifier from point annotations",
                       description="Detect cells in the slide(s), label the cells nearest to annotated points "
                                   "and train a classifier (--model) on morphology, hematoxylin and neighbourhood "
                                   "features (never DAB). Save it and pass it to `ihcscore score --classifier`.")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide file(s) the points were drawn on")
    p.add_argument("--points", nargs="+", required=True, metavar="POINTS.csv|.geojson",
                   help="one point file per slide: CSV x,y (level-0 px),class or QuPath point annotations")
    p.add_argument("--out", required=True, metavar="MODEL.skops", help="where to save the classifier")
    p.add_argument("--preset", default="cxcr4", metavar="NAME|FILE.toml", help="detection preset (default: cxcr4)")
    p.add_argument("--mpp", type=_pixel_size, metavar="UM", help="pixel size in µm/px if the file lacks it")
    p.add_argument("--max-distance", type=_positive_float, default=6.0, metavar="UM",
                   help="a point labels the nearest cell within this distance, µm (default 6)")
    p.add_argument("--model", choices=("random_forest", "gradient_boosting"), default="random_forest",
                   help="scikit-learn classifier to train (default: random_forest)")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    import numpy as np
    import pandas as pd

    from .classify import labels_from_points, read_point_annotations, train_classifier
    from .pipeline import analyze_slide
    from .preset import load_preset
    from .slide import open_slide

    if len(args.points) != len(args.slides):
        print(f"error: {len(args.slides)} slides but {len(args.points)} point files", file=sys.stderr)
        return 2
    if not Path(args.out).resolve().parent.is_dir():  # before the detection, not after it
        print(f"error: --out {args.out}: its folder does not exist", file=sys.stderr)
        return 2
    try:
        preset = load_preset(args.preset)
        tables, labels = [], []
        for slide_path, points_path in zip(args.slides, args.points):
            xy, classes = read_point_annotations(points_path)
            with open_slide(slide_path, mpp=args.mpp) as slide:
                w, h = slide.dimensions
                pts = np.asarray(xy, float).reshape(-1, 2)
                if len(pts) and not ((pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)).any():
                    raise ValueError(f"{points_path}: all {len(pts)} points lie outside {slide_path} ({w}×{h} px): "
                                     "the points of another slide, or not in level-0 pixels?")
                cells = analyze_slide(slide, preset, tissue="auto").cells
                labels.append(labels_from_points(cells, xy, classes, args.max_distance, mpp=slide.mpp))
            tables.append(cells)
            n_lab = int(sum(v is not None for v in labels[-1]))
            print(f"{slide_path}: {len(cells)} cells, {n_lab} of {len(xy)} points matched to a cell")
            if len(xy) and n_lab < 0.5 * len(xy):
                print(f"warning: {points_path}: only {n_lab} of {len(xy)} points lie within {args.max_distance:g} µm "
                      f"of a cell of {slide_path}: are these its points?", file=sys.stderr)
        for i, t in enumerate(tables):
            t["slide"] = i  # neighbourhood features stay within each slide
        model = train_classifier(pd.concat(tables, ignore_index=True), np.concatenate(labels), model=args.model)
        model.detection = dataclasses.asdict(preset.detection)  # scoring with other detection is refused
        model.save(args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {args.out}: cannot save the classifier ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"saved {args.out} ({len(model.feature_names)} features)")
    return 0


def _add_presets_parser(sub):
    p = sub.add_parser("presets", help="list packaged presets, or print one as TOML to copy and edit")
    p.add_argument("name", nargs="?", help="preset to print")
    p.set_defaults(func=run_presets)


def run_presets(args) -> int:
    from .preset import available_presets, load_preset

    if args.name:
        try:
            print(load_preset(args.name).to_toml())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    for name in available_presets():
        print(name)
    return 0


def _add_cohort_parser(sub):
    from . import cohort

    p = sub.add_parser("cohort", help="join slide scores with clinical outcomes (response, survival)")
    cohort.add_cohort_arguments(p)
    p.set_defaults(func=cohort.run_cohort)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ihcscore", description="Immunohistochemistry (DAB) cell scoring.")
    parser.add_argument("--version", action="version", version=f"ihcscore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score_parser(sub)
    _add_cohort_parser(sub)
    _add_train_parser(sub)
    _add_presets_parser(sub)
    return parser


#: Readers that log their own warnings about a damaged file; the CLI reports each failure in one line.
_QUIET_LOGGERS = ("tifffile", "imagecodecs", "PIL")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)  # their errors reach the user as ours, once
    if getattr(args, "workers", 1) <= 1 and not getattr(args, "dask", None):
        from .runtime import retain_freed_memory

        retain_freed_memory()  # tiles are scored in this process: reuse their freed buffers
    previous = _terminate_as_interrupt()
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        done = " (finished slides are kept: the same command resumes)" if args.command == "score" else ""
        print(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}{done}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``timeout``, ``docker stop``): unwound as Ctrl-C is, so
    temporary files go and finished slides stay."""


def _terminate_as_interrupt():
    """Raise :class:`Terminated` on SIGTERM in this (main) thread; the previous handler, or None."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
