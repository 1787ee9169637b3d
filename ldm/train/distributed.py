"""Training on several processes: what the launcher started against what accelerate set up, the output folder's
lock, and each process's rows of a global batch.

``train.batch_size`` is the global batch: W processes take ``batch_size / W`` rows each. Process ``r`` takes rows
``[r·b, (r+1)·b)`` of every global batch (the data order of :class:`ldm.train.loop.EpochBatches`) and of every random
draw made for it — latent noise, timesteps, masks — which each process draws for the whole global batch from the
global RNG that all of them hold alike (:class:`BatchShard`). DDP averages the processes' gradients, and the mean of
W per-process means over equal shares is the mean over the global batch, so W processes take the same steps as one
process does, up to the rounding of the sum.

Only the main process (rank 0) writes into the output folder; :func:`hold_output` keeps a second trainer out of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.data.scan import ScanShare
from ldm.errors import LdmError


def cpu_commands(script: str) -> str:
    """The commands that start N CPU processes of ``script``."""
    return (
        f"ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/ddp-cpu.yaml --num_processes N "
        f"{script} …, or ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node N {script} …"
    )


@dataclass(frozen=True, kw_only=True)
class Launch:
    """What the launcher says about this process: torchrun and accelerate's multi-GPU launcher set ``WORLD_SIZE``,
    ``RANK`` and ``LOCAL_RANK``; mpirun sets its own sizes. One process of rank 0 when nothing is set."""

    processes: int = 1
    rank: int = 0
    local_rank: int = 0
    source: str = ""  # the variable the size came from ("" when none)


SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    environ = os.environ if environ is None else environ

    def first(names: tuple[str, ...]) -> tuple[int, str]:
        for name in names:
            value = environ.get(name, "").strip()
            if value:
                try:
                    return int(value), name
                except ValueError:
                    raise LdmError(
                        f"{name}={value!r} is not a whole number; unset it or let the launcher set it"
                    ) from None
        return -1, ""

    processes, source = first(SIZE_VARIABLES)
    rank, local_rank = first(RANK_VARIABLES)[0], first(LOCAL_RANK_VARIABLES)[0]
    return Launch(processes=max(processes, 1), rank=max(rank, 0), local_rank=max(local_rank, 0), source=source)


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def check_launch(launch: Launch, environ: Mapping[str, str] | None = None) -> None:
    """Refuse the launch that silently runs one process where several were asked for: ``accelerate launch --cpu
    --num_processes N`` starts a single process (accelerate starts several CPU processes only through mpirun), and
    tells it so only by setting ``MASTER_ADDR`` without any process count."""
    environ = os.environ if environ is None else environ
    if launch.source or not _flag(environ, "ACCELERATE_USE_CPU") or "MASTER_ADDR" not in environ:
        return
    if "LOCAL_RANK" in environ:
        return
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "SCRIPT"  # for the message only
    raise LdmError(
        "accelerate launch --cpu started one process although --num_processes asked for more (it starts several CPU "
        f"processes only through mpirun); for N CPU processes run {cpu_commands(script)}, or drop --num_processes"
    )


def has_accelerator_device() -> bool:
    """Whether accelerate would give the processes a device of their own (CUDA, XPU, NPU, MLU, MUSA)."""
    if torch.cuda.is_available():
        return True
    from accelerate.utils import is_mlu_available, is_musa_available, is_npu_available, is_xpu_available

    return any(check() for check in (is_xpu_available, is_npu_available, is_mlu_available, is_musa_available))


def check_processes(launch: Launch, *, processes: int, kind: str) -> None:
    """The launcher's process count must be accelerate's: else each process would train alone, all of them into
    one output folder."""
    if launch.processes == processes:
        return
    raise LdmError(
        f"the launcher started {launch.processes} processes ({launch.source}={launch.processes}) but accelerate set up "
        f"{processes} ({kind}), so each would train on its own into the same output folder; for CPU processes set "
        "ACCELERATE_USE_CPU=1, for GPUs check that each process sees one (CUDA_VISIBLE_DEVICES)"
    )


def per_process_batch(batch_size: int, processes: int) -> int:
    """The rows of the global batch ``batch_size`` that each of ``processes`` takes."""
    if batch_size % processes:
        lower, upper = max(processes, batch_size // processes * processes), (batch_size // processes + 1) * processes
        fix = " or ".join(str(n) for n in sorted({lower, upper}))
        raise LdmError(
            f"train.batch_size {batch_size} is the global batch and must split evenly among {processes} processes; "
            f"set --set train.batch_size={fix}"
        )
    return batch_size // processes


@dataclass(frozen=True, kw_only=True)
class BatchShard:
    """This process's rows of each global batch: ``rank``'s share of ``processes`` equal ones.

    A random draw for a micro-batch is made for the whole global batch (``global_shape``, ``global_count``) and cut
    down to this process's rows (``local``): every process holds the same global RNG state, so the processes
    together draw what one process would, and they stay in step with each other."""

    rank: int = 0
    processes: int = 1

    def global_count(self, local: int) -> int:
        return local * self.processes

    def global_shape(self, local_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        return (self.global_count(local_shape[0]), *local_shape[1:])

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """Rows ``[rank·b, (rank+1)·b)`` of a global batch's ``values`` (B_global, …)."""
        if self.processes == 1:
            return values
        b = len(values) // self.processes
        return values[self.rank * b : (self.rank + 1) * b]


def batch_shard(accelerator) -> BatchShard:
    return BatchShard(rank=accelerator.process_index, processes=accelerator.num_processes)


# --- collectives over Python objects and floats -------------------------------------------------------------------


def gather_objects(accelerator, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (a collective: all of them call it)."""
    if accelerator.num_processes == 1:
        return [obj]
    gathered: list[Any] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def scan_share(accelerator) -> ScanShare | None:
    """The share of the data scan this process decodes (None on a single process)."""
    if accelerator.num_processes == 1:
        return None
    return ScanShare(accelerator.process_index, accelerator.num_processes, lambda obj: gather_objects(accelerator, obj))


def main_process_object(accelerator, obj: Any) -> Any:
    """The main process's ``obj``, on every process (a collective)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """``values`` averaged over the processes (each holds the same keys): the logged losses are the global batch's."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(tensor, reduction="mean").tolist()))


def average_gradients(accelerator, params) -> None:
    """All-reduce (mean) the gradients of ``params`` that sit outside the prepared (DDP) models, as DDP does for
    its own; every process must hold gradients for the same parameters."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# --- the output folder's lock -------------------------------------------------------------------------------------

LOCK_NAME = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def _holder(path: Path) -> dict | None:
    """The lock's record, or None when it is unreadable (a write cut short)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def acquire_lock(folder: Path, *, processes: int) -> tuple[Path, str | None]:
    """Create ``folder/train.lock`` for this process; (the lock, None), or (the lock, the refusal) when a live
    trainer holds it. A lock whose process is gone (killed) is taken over, with a note."""
    path = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "processes": processes,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    for _ in range(3):  # two trainers that both find a stale lock: one of them creates the new one
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder["pid"] != os.getpid():
                if holder.get("host") != record["host"]:
                    return path, (
                        f"{folder} is in use by a trainer on {holder.get('host')} (pid {holder['pid']}, started "
                        f"{holder.get('started')}); pass another --out, or delete {path} if no trainer runs there"
                    )
                if _alive(holder["pid"]):
                    return path, (
                        f"{folder} is in use by another trainer (pid {holder['pid']}, started {holder.get('started')}); "
                        f"wait for it to finish or pass another --out (delete {path} only if pid {holder['pid']} is "
                        "no trainer)"
                    )
                print(f"note: took over {path} from pid {holder['pid']}, which is gone (killed?)")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
        return path, None
    return path, f"could not create {path}; another trainer keeps taking it: pass another --out"


@contextlib.contextmanager
def hold_output(accelerator, folder: str | Path) -> Iterator[None]:
    """Hold the output folder for this run: the main process takes ``OUT/train.lock`` and every process raises
    the refusal when another live trainer holds it (two runs writing one folder would mix their checkpoints and
    bundle). Released when the run ends, however it ends; a folder this created and left empty is removed."""
    folder = Path(folder)
    created, lock, refusal = False, None, None
    if accelerator.is_main_process:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        lock, refusal = acquire_lock(folder, processes=accelerator.num_processes)
    refusal = main_process_object(accelerator, refusal)
    if refusal is not None:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise LdmError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            holder = _holder(lock)
            if holder is not None and holder["pid"] == os.getpid():
                lock.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty: a run refused before it wrote anything leaves nothing
