"""Score folders of slides: failures isolated, resumable, on processes or Dask.

One slide at a time is scored; its tiles run in parallel (processes, or a
``dask.distributed`` cluster). After every slide scored (or failed)
``summary.csv`` and ``failures.csv`` are rewritten atomically, so a crash loses
at most the slide in progress, and a rerun skips slides whose outputs are complete and were
made with the same parameters (the ``_COMPLETE`` marker holds their hash).
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .export import (COMPLETE_MARKER, claim_folder, folder_lock, hash_params, is_complete, read_csv_rows,
                     record_source_path, recorded_source, release_folder, same_place, same_source, slide_source,
                     source_key, summary_row, update_folder_tables, write_slide_outputs)
from .pipeline import analyze_slide
from .runtime import process_alive
from .slide import slide_name

__all__ = ["SLIDE_EXTENSIONS", "find_slides", "output_names", "slide_params_hash", "score_slide", "score_batch",
           "BatchResult", "dask_client", "DaskSetupError"]

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff",
                    ".png", ".jpg", ".jpeg")


def find_slides(path) -> list[Path]:
    """The slide files a path names: itself, or the slides directly inside a folder (sorted).

    A link to a slide whose target is gone (an unmounted share) is kept: it fails, and is reported,
    rather than silently missing from the batch.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir()
                  if (p.is_file() or (p.is_symlink() and not p.exists()))
                  and not p.name.startswith(".") and p.suffix.lower() in SLIDE_EXTENSIONS)


def output_names(paths, out_root=None, sources=None) -> list[str]:
    """The output folder name of each slide of a batch: its name, unique within the batch and ``out_root``.

    A slide keeps the folder of ``out_root`` that holds its outputs (or its claim, :func:`~ihcscore.export.
    claim_folder`) under whatever name, also after the slide moved to another folder or was copied; a folder
    its own path recorded comes first (two copies of one file in one batch keep their own folders), then the
    earlier file at its path (replaced in place), then its file recorded elsewhere (moved or copied). Any other slide gets its name unless another slide has a
    claim on it: another slide of that name in the batch (``a/x.svs``, ``b/x.svs``), or the outputs of
    another file in ``out_root/<name>``. Such slides are told apart by the folder they are in (``a_x``), then
    by their file name too (``a_x.tiff`` beside ``a_x.tif``), then by a number (``a_x.tif-2``).
    ``sources``: the slides' :func:`~ihcscore.export.slide_source` (or None), when already known.
    """
    paths = [Path(p) for p in paths]
    names = [slide_name(p) for p in paths]
    # where the path given is (a link's own folder, `..` resolved as written)
    folders = [Path(os.path.normpath(p.absolute())).parent.name for p in paths]
    levels = [[n, f"{d}_{n}", f"{d}_{p.name}"] for p, n, d in zip(paths, names, folders)]
    if sources is None:
        sources = [_source_or_none(p) if out_root is not None else None for p in paths]
    held: dict[str, dict] = {}  # what each folder of out_root holds (outputs or a live claim), read once
    if out_root is not None and Path(out_root).is_dir():
        for d in Path(out_root).iterdir():
            there = recorded_source(d) if d.is_dir() else None
            if there is not None:
                held[d.name] = there

    # the folders by the file they hold and by the path it was at: each slide looks up its own, not all
    by_file: dict[tuple, list[str]] = {}
    by_path: dict[str, list[str]] = {}
    for name, there in held.items():
        by_file.setdefault(source_key(there), []).append(name)
        if there.get("path") is not None:
            by_path.setdefault(there["path"], []).append(name)
    in_batch = {}
    for k, o in enumerate(sources):
        if o is not None:
            in_batch.setdefault(source_key(o), set()).add(k)

    def owned(i):
        """The folders holding slide ``i``'s outputs, best first: its file at its path, the earlier file at its
        path (replaced in place, unless another slide of the batch is that very file), its file from elsewhere
        (moved or copied)."""
        source = sources[i]
        if source is None:
            return []
        here, replaced, moved = [], [], []
        for name in by_file.get(source_key(source), []) + by_path.get(source.get("path"), []):
            there = held[name]
            if same_source(there, source):
                (here if same_place(there, source) else moved).append(name)
            elif same_place(there, source) and not (in_batch.get(source_key(there), set()) - {i}):
                replaced.append(name)
        rank = {n: k for k, n in enumerate(levels[i])}

        def order(names):
            return sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n))

        return order(here) + order(replaced) + order(moved)

    chosen: list[str | None] = [None] * len(paths)
    taken: set[str] = set()
    own = [owned(i) for i in range(len(paths))]
    at_home = [bool(o) and same_place(held[o[0]], sources[i]) for i, o in enumerate(own)]
    for i in sorted(range(len(paths)), key=lambda i: not at_home[i]):
        name = next((n for n in own[i] if n not in taken), None)
        if name is not None:
            chosen[i] = name
            taken.add(name)
    for i in range(len(paths)):  # then free names, the plainest first
        if chosen[i] is not None:
            continue
        name = None
        for level, plain in enumerate(levels[i]):
            repeated = sum(lv[level] == plain for lv in levels) > 1
            if (not repeated or level == len(levels[i]) - 1) and plain not in taken and plain not in held:
                name = plain
                break
        if name is None:
            base = levels[i][-1]
            name = next(n for n in (f"{base}-{k}" for k in itertools.count(2)) if n not in taken and n not in held)
        chosen[i] = name
        taken.add(name)
    assert len(set(chosen)) == len(chosen), chosen
    return chosen


def _source_or_none(path: Path):
    """:func:`~ihcscore.export.slide_source`, or None for a file that is missing or cannot be read (it fails
    on its own when scored, with the others going on)."""
    try:
        return slide_source(path) if path.is_file() else None
    except OSError:
        return None


def slide_params_hash(preset, stains_spec: str, tissue: str, mpp, classifier=None, gpu: bool = False) -> str:
    """Hash of everything that changes a slide's results (not tile size or workers: they must not).

    ``gpu`` enters only when set, so CPU outputs made before it existed still count as complete.
    """
    # a mask or annotation file by its content: an edited file changes the cells, a moved one does not
    tissue_key = str(tissue) if tissue is None or str(tissue).lower() in ("auto", "all") or \
        not Path(tissue).is_file() else _file_digest(tissue)
    params = {"preset": preset.to_dict(), "stains": str(stains_spec), "tissue": tissue_key,
              "mpp": mpp, "classifier": _file_digest(classifier), "version": __version__}
    if gpu:  # the GPU's smoothing rounds differently: a pixel at a threshold may fall the other way
        params["device"] = "gpu"
    return hash_params(params)


def _file_digest(path):
    import hashlib

    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _report_fields(slide, cells, ds_det: float, n_fields: int = 3, side_um: float = 150.0):
    """A few representative fields (the densest tumour areas) for the report overlay."""
    if len(cells) == 0:
        return []
    side = int(side_um / slide.mpp)
    xy = cells[["x_px", "y_px"]].to_numpy()
    grid = np.floor(xy / side).astype(int)
    keys, counts = np.unique(grid, axis=0, return_counts=True)
    fields = []
    for k in keys[np.argsort(-counts)][:n_fields]:
        x0, y0 = int(k[0] * side), int(k[1] * side)
        ds = max(1.0, ds_det)
        level = slide.level_count - 1
        while level > 0 and slide.level_downsamples[level] > ds:
            level -= 1
        d = slide.level_downsamples[level]
        # whole pixels of the level read: the field starts where its first pixel does (x0 rounded down to one)
        lx, ly, n = int(x0 // d), int(y0 // d), int(side / d)
        rgb = slide.read_level_region(level, (lx, ly), (n, n))
        ox, oy = lx * d, ly * d
        sel = cells[(cells["x_px"] >= ox) & (cells["x_px"] < ox + n * d) &
                    (cells["y_px"] >= oy) & (cells["y_px"] < oy + n * d)]
        fields.append({"rgb": rgb, "origin_px": (ox, oy), "downsample": d, "cells": sel})
    return fields


@dataclass
class BatchResult:
    rows: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def score_slide(path, out_root, preset, *, stains=None, stains_spec="default", tissue="auto", mpp=None,
                tile_size=1024, workers=1, client=None, csv=False, report=True, progress=None,
                classifier=None, gpu=False, out_name=None, params_hash=None) -> dict:
    """Score one slide and write its output folder; returns its summary.json content.

    ``classifier`` is the path of a trained classifier (``ihcscore train``); default the morphology rule.
    ``gpu``: deconvolution and detection smoothing on the GPU (:func:`~ihcscore.pipeline.analyze_slide`).
    ``out_name``: the output folder ``out_root/out_name`` and summary's ``slide`` (default the slide's name;
    :func:`output_names` keeps them unique in a batch). ``params_hash``: :func:`slide_params_hash` of these
    arguments, when the caller has it (a batch computes it once).
    """
    from .classify import CellClassifier
    from .slide import open_slide

    model = CellClassifier.load(classifier) if classifier is not None else None
    source = slide_source(path)  # before reading: the outputs are of these bytes
    with open_slide(path, mpp=mpp) as slide:
        result = analyze_slide(slide, preset, stains=stains, tissue=tissue, tile_size=tile_size,
                               workers=workers, client=client, polygons=True, progress=progress,
                               classifier=model, gpu=gpu)
        if slide_source(path) != source:  # a scanner or a copy still writing it
            raise ValueError(f"{path}: the file changed while it was scored; score it again once it is complete")
        summary = result.summary
        if out_name is not None:
            summary["slide"] = out_name
        images = {}
        if report:
            thumb = slide.thumbnail(1024)
            images = {"thumbnail": thumb, "tissue_mask": result.tissue_mask,
                      "thumbnail_downsample": max(slide.dimensions) / max(thumb.shape[:2]),
                      "fields": _report_fields(slide, result.cells, summary["detection_pixel_size_um"] / slide.mpp),
                      "hotspot_grid": result.hotspot_grid}
        out_dir = Path(out_root) / summary["slide"]
        write_slide_outputs(out_dir, summary, result.cells, mpp=slide.mpp, csv=csv, report=report,
                            overlay_images=images, workers=workers,
                            params_hash=params_hash or slide_params_hash(preset, stains_spec, tissue, mpp, classifier,
                                                                         gpu),
                            source=source)
    return summary


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Delete ``<name>.tmp-<pid>`` files a killed run left behind (never those of a live process here)."""
    import os

    if not out_dir.is_dir():
        return
    for tmp in out_dir.glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and process_alive(int(pid)):
            continue  # this process's or another live process's file
        try:
            tmp.unlink()
        except OSError:
            pass


def dask_client(address: str, workers: int = 2):
    """A ``dask.distributed.Client``: ``"local"`` starts a LocalCluster on loopback."""
    from distributed import Client, LocalCluster

    if address == "local":
        import signal
        import threading

        # The cluster's processes inherit an ignored SIGINT: Ctrl-C is this process's to report (in one line),
        # where each worker would print tracebacks of its own.
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0")  # a free port
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        return Client(cluster, set_as_default=False)  # the tiles are sent to it by name, nothing else
    client = _connect(address)
    try:
        _check_workers(client, address)
    except Exception:
        client.close()
        raise
    return client


#: Seconds to wait for a scheduler's answer, and then for its first worker.
CONNECT_TIMEOUT_S, WORKER_WAIT_S = 45.0, 60.0


def _connect(address: str):
    """``Client(address)`` with a deadline: a port that accepts and never answers as a scheduler (a
    dashboard's HTTP port) would keep it waiting forever. A daemon thread, so a hung attempt does not
    keep the process alive."""
    import threading

    from distributed import Client

    box, lock = {}, threading.Lock()

    def attempt():
        try:
            # not the process's default client: an abandoned attempt must not capture every later dask compute
            client = Client(address, timeout=f"{max(1, int(CONNECT_TIMEOUT_S * 2 / 3))}s", set_as_default=False)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
            return
        with lock:
            if box.get("abandoned"):  # answered after the caller gave up: nobody will close it
                client.close()
            else:
                box["client"] = client

    t = threading.Thread(target=attempt, daemon=True, name="ihcscore-dask-connect")
    t.start()
    t.join(CONNECT_TIMEOUT_S)
    with lock:
        box["abandoned"] = "client" not in box and "error" not in box
    if box["abandoned"]:
        raise TimeoutError(f"no Dask scheduler answered within {CONNECT_TIMEOUT_S:g} s (is it the scheduler's "
                           "port, e.g. 8786, not its dashboard's?)")
    if "error" in box:
        e = box["error"]
        if isinstance(e, (OSError, ValueError, TimeoutError, ImportError)):
            raise e
        raise OSError(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None  # not a scheduler
    return box["client"]


class DaskSetupError(RuntimeError):
    """A scheduler answered, but its cluster cannot score: no workers, or workers of another ihcscore."""


def _check_workers(client, address: str) -> None:
    """The cluster has workers, and they run this version of ihcscore (another one gives other cells,
    under this version's name, which reruns then take as done). :class:`DaskSetupError` otherwise."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise DaskSetupError(f"the scheduler has no workers (waited {WORKER_WAIT_S:g} s): start `dask worker "
                             f"{address}`") from None
    workers = client.get_versions(packages=["ihcscore"])["workers"]  # asked by name: works without ihcscore there
    other = {str(w["packages"].get("ihcscore") or "none") for w in workers.values()} - {__version__}
    if other:
        raise DaskSetupError(f"its workers run ihcscore {', '.join(sorted(other))}, this client {__version__}: "
                             f"install ihcscore=={__version__} on the workers")


def score_batch(paths, out_root, preset, *, stains=None, stains_spec="default", tissue="auto", mpp=None,
                tile_size=1024, workers=1, client=None, csv=False, report=True, resume=True,
                on_slide_start=None, on_tile=None, on_slide_end=None, classifier=None, gpu=False) -> BatchResult:
    """Score many slides; one failure never stops the others.

    Parameters
    ----------
    paths : list of path
    out_root : path
        ``DIR``: gets ``DIR/<slide>/...`` (:func:`output_names`), and ``DIR/summary.csv``, ``DIR/failures.csv``
        rewritten after every slide scored or failed (resumed ones every 10 s and at the end: their rows are
        there already) with this run's rows merged into those already there
        (:func:`~ihcscore.export.update_folder_tables`: other runs' slides are kept).
    resume : bool
        Skip slides whose outputs are complete and were made of the same slide file with the same
        parameters (and on the same kind of device: a CPU run redoes a slide scored with ``gpu``,
        and the reverse).
    gpu : bool
        Deconvolution and detection smoothing on the GPU (:func:`~ihcscore.pipeline.analyze_slide`).
    on_slide_start(path, index, total), on_tile(done, total), on_slide_end(path, row) : callables, optional
        Progress hooks (the CLI draws progress bars with them).

    Returns
    -------
    BatchResult
    """
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    for table in ("summary.csv", "failures.csv"):
        read_csv_rows(out_root / table)  # unreadable (another encoding): say so now, not after the first slide
    result = BatchResult()
    sources = [_source_or_none(Path(p)) for p in paths]  # read before the lock: other jobs wait on it
    # Chosen and claimed under the folder's lock: a run starting beside this one sees the claims
    run = uuid.uuid4().hex  # this call's claims (another call in this process has its own)
    with folder_lock(out_root):
        names = output_names(paths, out_root, sources)
        # held for the whole rewrite too (the marker goes first); a folder another live run holds is not ours
        claimed = {name for name, source in zip(names, sources)
                   if source is not None and claim_folder(out_root / name, source, run)}
    try:
        _score_in_turn(paths, names, out_root, result, preset, stains=stains, stains_spec=stains_spec, tissue=tissue,
                       mpp=mpp, tile_size=tile_size, workers=workers, client=client, csv=csv, report=report,
                       resume=resume, on_slide_start=on_slide_start, on_tile=on_tile, on_slide_end=on_slide_end,
                       classifier=classifier, gpu=gpu, run=run, claimed=claimed)
    finally:  # a run stopped (Ctrl-C, SIGTERM, an error) leaves none of its claims behind
        for name in names:
            release_folder(out_root / name, run)
    return result


#: Seconds between rewrites of the folder's tables while a rerun only resumes slides.
TABLES_EVERY_S = 10.0


def _score_in_turn(paths, names, out_root, result, preset, *, stains, stains_spec, tissue, mpp, tile_size, workers,
                   client, csv, report, resume, on_slide_start, on_tile, on_slide_end, classifier, gpu, run, claimed):
    """:func:`score_batch`'s slides one after the other, each row and failure added to ``result``."""
    h = slide_params_hash(preset, stains_spec, tissue, mpp, classifier, gpu)  # one for the batch (files read once)
    done: dict[str, str] = {}  # name -> file of the slides scored so far
    last_write = time.monotonic()
    for i, (path, name) in enumerate(zip(paths, names)):
        path = Path(path)
        if on_slide_start:
            on_slide_start(path, i, len(paths))
        t0 = time.perf_counter()
        out_dir = out_root / name
        try:
            wanted = [f for f, on in (("cells.csv", csv), ("report.html", report)) if on]
            if resume and is_complete(out_dir, h, slide_source(path), required=wanted):
                summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
                row = summary_row(summary, status="ok")
                row["resumed"] = True
                if name in claimed:  # not while another run rewrites the folder
                    record_source_path(out_dir, slide_source(path))  # moved here: a re-export here comes back
                release_folder(out_dir, run)
            else:
                _remove_stale_temporaries(out_dir)
                if (out_dir / COMPLETE_MARKER).exists():
                    # scored again: its old row must not stand as "ok" if this run dies half-way
                    update_folder_tables(out_root, [], dropped=[name])
                summary = score_slide(path, out_root, preset, stains=stains, stains_spec=stains_spec, tissue=tissue,
                                      mpp=mpp, tile_size=tile_size, workers=workers, client=client, csv=csv,
                                      report=report, progress=on_tile, classifier=classifier, gpu=gpu,
                                      out_name=name, params_hash=h)
                row = summary_row(summary, status="ok")  # runtime_s: the analysis, as when resumed
                row["resumed"] = False
        except Exception as e:  # isolate: report and go on with the next slide
            msg = " ".join(str(e).split()) or type(e).__name__
            if str(path) not in msg and path.name not in msg:
                msg = f"{path}: {msg}"
            result.failures.append({"slide": name, "path": str(path), "error": msg})
            release_folder(out_dir, run)
            row = summary_row(None, status="failed", runtime_s=round(time.perf_counter() - t0, 3), error=msg,
                              slide=name)
            row.update(preset=preset.name, software_version=__version__)
            row["resumed"] = False
        result.rows.append(row)
        done[name] = str(path)
        # A resumed slide's row is already in the tables (from its run): rewriting them (and index.html) after
        # each one made a rerun of a large cohort quadratic; they are rewritten after a scored or failed slide,
        # every TABLES_EVERY_S seconds, and at the end.
        if not row.get("resumed") or time.monotonic() - last_write >= TABLES_EVERY_S or i == len(paths) - 1:
            update_folder_tables(out_root, result.rows, result.failures, index=report, paths=done)
            last_write = time.monotonic()
        if on_slide_end:
            on_slide_end(path, row)
    return result
