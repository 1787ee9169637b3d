"""Shared by the bench scripts: the machine, worker subprocesses, model bundles for benchmarking, Markdown."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path(os.environ.get("LDM_BENCH_DIR", "/tmp/ldm-bench"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    """What a reader needs to compare numbers: CPU, cores, threads used, versions, load at the start."""
    import diffusers
    import torch

    from ldm.accel.fast import cpu_flags, has_native_bf16, physical_cores

    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": " ".join(flags),
        "native_bf16": has_native_bf16(torch.device("cpu")),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_markdown(info: dict) -> str:
    return "\n".join(
        [
            (
                f"- CPU: {info['cpu']}, {info['physical_cores']} physical cores, {info['logical_cpus']} logical CPUs "
                f"(torch CPU capability {info['cpu_capability']}; flags: {info['cpu_flags'] or 'none of note'}; "
                f"native bf16: {'yes' if info['native_bf16'] else 'no'})"
            ),
            f"- threads used: {info['threads']} (torch.set_num_threads and OMP_NUM_THREADS in every worker)",
            f"- torch {info['torch']}, diffusers {info['diffusers']}, Python {info['python']}",
            f"- load average at the start: {info['load_average']}",
        ]
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class Timer:
    """Wall and CPU seconds of a block (CPU seconds tell how much of the wall time the process actually ran)."""

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self) -> Timer:  # noqa: PYI034 - typing.Self needs Python 3.11
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_worker(script: Path, args: list[str], *, threads: int, log: Path | None = None) -> dict:
    """Run ``python script --worker args`` in a fresh process (own memory peak, own thread pool); its last stdout
    line is a JSON object."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    cmd = [sys.executable, str(script), "--worker", *map(str, args), "--threads", str(threads)]
    print("  $", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_digest(config) -> str:
    from ldm.config import dump_yaml

    return hashlib.sha256(dump_yaml(config).encode()).hexdigest()[:10]


def bench_bundle(preset: str, workdir: Path, *, model_dir: Path | None = None) -> tuple[Path, str]:
    """A bundle folder to benchmark and how it was made: ``model_dir`` when it holds a bundle, else a random-weight
    bundle of ``preset`` (seed 0), created once in ``workdir`` (keyed by the preset's config)."""
    from ldm.formats.bundle import create_bundle, save_bundle
    from ldm.models.presets import PRESETS

    if model_dir is not None and (model_dir / "manifest.json").is_file():
        return model_dir, f"trained weights from {model_dir}"
    config = PRESETS[preset]
    folder = workdir / f"{preset}-random-{config_digest(config)}"
    if not (folder / "manifest.json").is_file():
        print(f"  creating a random-weight {preset} bundle in {folder}", flush=True)
        save_bundle(create_bundle(config, seed=0, name=f"{preset}-random"), folder)
    return folder, f"random weights (ldm.formats.bundle.create_bundle(PRESETS['{preset}'], seed=0))"


def exported(bundle_dir: Path, workdir: Path) -> Path:
    """The diffusers export of a bundle (ldm.formats.diffusers.export_diffusers), made once per bundle hash."""
    from ldm.formats.bundle import load_bundle, read_manifest
    from ldm.formats.diffusers import export_diffusers

    digest = read_manifest(bundle_dir)["hash"][:10]
    folder = workdir / f"{bundle_dir.name}-diffusers-{digest}"
    if not (folder / "model_index.json").is_file():
        print(f"  exporting {bundle_dir} to {folder}", flush=True)
        export_diffusers(load_bundle(bundle_dir), folder)
    return folder


def image_change(x, y) -> tuple[float, int, float, float]:
    """Two image batches in [0, 1] (numpy arrays): max |Δ|, max |Δ| of their uint8 renderings, mean |Δ|, and PSNR
    in dB (inf when equal)."""
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def as_uint8(v):  # as ldm.pipeline.to_uint8 and diffusers' numpy_to_pil round
        return np.round(v * 255)

    mse = float(np.mean((x - y) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(1 / mse))
    return float(np.abs(x - y).max()), int(np.abs(as_uint8(x) - as_uint8(y)).max()), float(np.abs(x - y).mean()), psnr


def quartiles(values: list[float]) -> str:
    """The quartiles of two or more values as " (q1–q3)", for a table cell beside their median; "" for fewer."""
    if len(values) < 2:
        return ""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return f" ({q[0]:.2f}–{q[2]:.2f})"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every bench script takes: threads, work folder, and the hidden --worker of its subprocesses."""
    from ldm.accel.fast import physical_cores

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def script_main(args: argparse.Namespace, worker: Callable[[argparse.Namespace], dict], section: Callable) -> None:
    """A worker prints its measurement as one JSON line; otherwise the script runs its section on its own."""
    if args.worker:
        print(json.dumps(worker(args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    text, _ = section(args, args.workdir)
    print(machine_markdown(machine(args.threads)) + "\n\n" + text)
