"""The same tiles on dask.distributed (a LocalCluster on loopback) give results identical to the local run."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

from ihcscore.cli import main  # noqa: E402
from ihcscore.pipeline import analyze_slide  # noqa: E402
from ihcscore.preset import load_preset  # noqa: E402
from ihcscore.slide import open_slide  # noqa: E402
from ihcscore.synthetic import make_synthetic_slide  # noqa: E402

ARGS = ["--tile-size", "256", "--no-report", "--quiet", "--tissue", "all"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("dask_in")
    make_synthetic_slide(d / "s1.tif", shape=(1024, 768), mpp=0.5, seed=11)
    make_synthetic_slide(d / "s2.tif", shape=(768, 768), mpp=0.5, seed=12)
    return d


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as c:
        yield c


@pytest.fixture(scope="module")
def local_out(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("dask_ref") / "out"
    assert main(["score", str(slides), "--out", str(out), *ARGS]) == 0
    return out


def _strip(s):
    s = dict(s)
    for k in ("runtime_s", "path"):
        s.pop(k, None)
    return s


def _same_outputs(out, ref):
    for stem in ("s1", "s2"):
        a = json.loads((Path(out) / stem / "summary.json").read_text())
        b = json.loads((Path(ref) / stem / "summary.json").read_text())
        assert _strip(a) == _strip(b)
        pd.testing.assert_frame_equal(pd.read_parquet(Path(out) / stem / "cells.parquet"),
                                      pd.read_parquet(Path(ref) / stem / "cells.parquet"), check_exact=True)


def test_analyze_slide_on_client_equals_local(slides, cluster):
    from distributed import Client

    preset = load_preset("cxcr4")
    with open_slide(slides / "s1.tif") as s:
        local = analyze_slide(s, preset, tile_size=256, tissue="all")
        with Client(cluster) as client:
            assert client.scheduler.address.startswith("tcp://127.0.0.1:")
            remote = analyze_slide(s, preset, tile_size=256, tissue="all", client=client)
            # the futures of a slide are released once fetched: nothing stays on the workers (the
            # release reaches the scheduler asynchronously)
            deadline = time.monotonic() + 20
            while client.who_has() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not client.who_has()
    assert len(local.cells) > 50
    pd.testing.assert_frame_equal(local.cells.drop(columns=["nucleus_polygon", "cell_polygon"], errors="ignore"),
                                  remote.cells.drop(columns=["nucleus_polygon", "cell_polygon"], errors="ignore"),
                                  check_exact=True)
    assert local.summary["all"] == remote.summary["all"]


def test_cli_dask_scheduler_address(slides, cluster, local_out, tmp_path, capsys):
    """`--dask tcp://127.0.0.1:PORT`: what a lab does with the address of its cluster's scheduler."""
    out = tmp_path / "out"
    assert main(["score", str(slides), "--out", str(out), *ARGS, "--dask", cluster.scheduler_address]) == 0
    _same_outputs(out, local_out)
    # without --quiet (slides resumed): where to watch the cluster
    assert main(["score", str(slides), "--out", str(out), *[a for a in ARGS if a != "--quiet"],
                 "--dask", cluster.scheduler_address]) == 0
    assert f"Dask dashboard: {cluster.dashboard_link}" in capsys.readouterr().err


def test_cli_dask_local(slides, local_out, tmp_path):
    out = tmp_path / "out"
    assert main(["score", str(slides), "--out", str(out), *ARGS, "--dask", "local", "--workers", "1"]) == 0
    _same_outputs(out, local_out)


def test_cli_dask_unreachable_scheduler(slides, tmp_path, capsys):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        rc = main(["score", str(slides), "--out", str(tmp_path / "out"), *ARGS, "--dask", "tcp://127.0.0.1:9"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()  # --quiet silences the bars, not the errors
    assert len(err) == 1 and "cannot connect" in err[0]


def test_local_cluster_leaves_ctrl_c_to_this_process():
    """`--dask local`: the cluster's processes ignore SIGINT (no tracebacks of their own on Ctrl-C); ours does not."""
    import signal

    from ihcscore.batch import dask_client

    before = signal.getsignal(signal.SIGINT)
    client = dask_client("local", 1)
    try:
        assert signal.getsignal(signal.SIGINT) is before
        on_workers = client.run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        assert list(on_workers.values()) == [True]
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


# ----------------------------------------------------------------------------- schedulers that are not what they seem


def _listener(reply: bytes | None):
    """A TCP port that accepts and then says ``reply`` (an SSH banner) or nothing at all (an HTTP port)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return srv, f"tcp://127.0.0.1:{srv.getsockname()[1]}"


@pytest.mark.parametrize("reply", [None, b"SSH-2.0-OpenSSH_9.6\r\n" + b"\xff" * 64])
def test_a_port_that_is_not_a_scheduler_is_one_line_in_bounded_time(slides, tmp_path, monkeypatch, capsys, reply):
    import ihcscore.batch as batch

    monkeypatch.setattr(batch, "CONNECT_TIMEOUT_S", 6.0)
    srv, address = _listener(reply)
    try:
        t0 = time.monotonic()
        rc = main(["score", str(slides / "s2.tif"), "--out", str(tmp_path / "out"), *ARGS, "--dask", address])
        took = time.monotonic() - t0
    finally:
        srv.close()
    assert rc == 2 and took < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --dask {address}: cannot connect"), err


def test_a_scheduler_without_workers_is_one_line(slides, tmp_path, monkeypatch, capsys):
    import ihcscore.batch as batch
    from distributed import LocalCluster

    monkeypatch.setattr(batch, "WORKER_WAIT_S", 2.0)
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as empty:
        rc = main(["score", str(slides / "s2.tif"), "--out", str(tmp_path / "out"), *ARGS,
                   "--dask", empty.scheduler_address])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no workers" in err


def test_workers_of_another_version_are_refused(cluster, slides, tmp_path, monkeypatch):
    """Workers that run another ihcscore give other cells under this version's name (reruns took them as done):
    refused when connecting, and tile by tile for a worker that joins later (its own _TileJob runs there)."""
    import os
    import shutil
    import subprocess
    import sys

    import ihcscore
    import ihcscore.batch as batch
    from distributed import Client, LocalCluster

    with Client(cluster) as client:
        batch._check_workers(client, cluster.scheduler_address)  # the same version: accepted
        monkeypatch.setattr(batch, "__version__", "0.0.1")
        with pytest.raises(batch.DaskSetupError, match=r"workers run ihcscore \S+, this client 0.0.1"):
            batch._check_workers(client, cluster.scheduler_address)
    monkeypatch.undo()

    old = tmp_path / "old"  # an older ihcscore: its tiles come back as 0.2.0's did, without a version
    shutil.copytree(Path(ihcscore.__file__).parent, old / "ihcscore")
    init, pipe = old / "ihcscore" / "__init__.py", old / "ihcscore" / "pipeline.py"
    init.write_text(init.read_text().replace(f'__version__ = "{ihcscore.__version__}"', '__version__ = "0.2.0"'))
    code = pipe.read_text()
    assert "return __version__, pack_tile(" in code
    pipe.write_text(code.replace("return __version__, pack_tile(", "return pack_tile("))
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as empty, \
            Client(empty) as client:
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", empty.scheduler_address,
                                   "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                  env={**os.environ, "PYTHONPATH": str(old)}, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(1, timeout=60)
            with open_slide(slides / "s2.tif") as s, pytest.raises(RuntimeError, match="runs an older ihcscore"):
                analyze_slide(s, load_preset("cxcr4"), tile_size=256, tissue="all", client=client)
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def test_the_cluster_is_used_by_name_not_made_the_process_default(cluster, slides):
    """Tiles go to the client given; between them dask's scheduler is not left set to it (other threads'
    dask computes, a viewer's pyramid reads, ran on the cluster or failed)."""
    import dask
    from distributed import Client

    seen = []
    with Client(cluster, set_as_default=False) as client, open_slide(slides / "s2.tif") as s:
        res = analyze_slide(s, load_preset("cxcr4"), tile_size=256, tissue="all", client=client,
                            progress=lambda done, total: seen.append(dask.config.get("scheduler", None)))
    assert len(res.cells) > 50 and len(seen) > 2
    assert "dask.distributed" not in seen
