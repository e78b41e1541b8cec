"""Shared helpers for the benchmark scripts: header, tables, the ratio line, inputs, private Ray."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "models" / "tokenflow-tiny.yaml"

log = logging.getLogger("benchmarks")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny inputs (smoke test of the script)")
    p.add_argument("--work-dir", help="where inputs and outputs go (default: a temp dir, removed)")
    return p


def header(title: str) -> None:
    """Print what ran where: the machine, versions, the load average and the command."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {title}")
    print(f"machine: {os.cpu_count()} CPUs, {mem_gib:.0f} GiB, GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"load average at start (1, 5, 15 min): {load}")
    print(f"command: {' '.join(sys.orig_argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (floats to 3 significant digits unless already strings)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    print()


def ratio_line(ratios: dict[str, float]) -> None:
    """The last line of every benchmark: ``ratios: name=value ...``."""
    print("ratios: " + " ".join(f"{k}={v:.3g}" for k, v in ratios.items()), flush=True)


@contextlib.contextmanager
def work_dir(path: str | None) -> Iterator[Path]:
    """``path`` (kept), or a fresh temp dir removed afterwards."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="tfbench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_corpus(out: Path, num_samples: int, shard_size: int, heldout_fraction: float = 0.0,
                image_size: int = 64) -> dict[str, Any]:
    """A shapes corpus (webdataset tars, ``image_size`` px PNGs) and its manifest, reused when
    already there."""
    from tokenflow import storage
    from tokenflow.config import CorpusConfig, ShapesCorpusConfig
    from tokenflow.stages.corpus import build_corpus

    manifest_path = out / "_MANIFEST.json"
    if manifest_path.exists():
        return storage.read_json(str(manifest_path))
    shapes = ShapesCorpusConfig(num_samples=num_samples, shard_size=shard_size, seed=0,
                                heldout_fraction=heldout_fraction, image_size=image_size)
    return build_corpus(CorpusConfig(shapes=shapes), str(out))


def make_tiny_tokenizer(path: Path) -> Path:
    """The tiny tokenizer, randomly initialised (seed 0), saved as the inference export."""
    import torch

    from tokenflow.config import load_config
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    if not path.exists():
        torch.manual_seed(0)
        save_tokenizer(TokenFlowTokenizer(load_config(TINY_CONFIG).tokenizer, with_teacher=False), path,
                       include_teacher=False)
    return path


class CpuSampler:
    """CPU seconds (user + system) of this process and all its descendants, sampled in a thread.

    A local Ray instance started by this process (GCS, raylet, workers, actors) is among its
    descendants, so CPU time of a whole stage is accounted for, whatever else loads the machine.
    A process that ends between two samples loses at most ``interval`` seconds of CPU; the
    sampling thread's own CPU is not counted.
    """

    _SELF = (-1, 0.0)  # the sampling thread's own CPU, as a pseudo-process

    def __init__(self, interval: float = 0.25, rescan: float = 2.0):
        import threading

        self.interval, self.rescan = interval, rescan
        self.series: dict[tuple[int, float], list[tuple[float, float]]] = {}  # (pid, created) -> [(t, cpu)]
        self.labels: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me, procs, scanned = psutil.Process(), {}, 0.0
        while True:
            now = time.time()
            if now - scanned >= self.rescan:
                for p in [me, *me.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        procs.setdefault((p.pid, p.create_time()), p)
                for key, p in procs.items():  # Ray renames a worker process when it becomes an actor
                    with contextlib.suppress(psutil.Error):
                        self.labels[key] = " ".join(p.cmdline())[:120] or p.name()
                scanned = now
            for key, p in list(procs.items()):
                try:
                    cpu = p.cpu_times()
                except psutil.Error:
                    del procs[key]
                    continue
                self.series.setdefault(key, []).append((now, cpu.user + cpu.system))
            self.series.setdefault(self._SELF, []).append((now, time.thread_time()))
            if self._stop.wait(self.interval):
                return

    def cpu(self, start: float, end: float, label_has: str = "", pid: int | None = None) -> float:
        """CPU seconds spent between wall times ``start`` and ``end`` (``time.time()``) by the
        sampled processes whose command line contains ``label_has`` (and whose id is ``pid``)."""
        def at(key: tuple[int, float], t: float) -> float:
            before = [cpu for when, cpu in self.series[key] if when <= t]
            return before[-1] if before else 0.0 if key[1] >= start else self.series[key][0][1]

        def counted(key: tuple[int, float]) -> bool:  # a process gone before its command line was read has none
            return key != self._SELF and label_has in self.labels.get(key, "") and pid in (None, key[0])

        keys = list(self.series)  # the sampling thread adds processes meanwhile
        used = sum(at(k, end) - at(k, start) for k in keys if counted(k))
        if any(counted(k) and k[0] == os.getpid() for k in keys):  # the sampler runs in this process
            used -= at(self._SELF, end) - at(self._SELF, start)
        return used


@contextlib.contextmanager
def private_ray(num_cpus: int = 2) -> Iterator[None]:
    """A new local Ray instance of this process only (never attaches to another cluster)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp = tempfile.mkdtemp(prefix="tfr", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=temp, runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}})
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
