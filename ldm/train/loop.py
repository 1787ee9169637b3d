"""The training loop every training script shares: accelerate, EMA, checkpoint/resume, logging, sample grids.

A script supplies its models, optimizers and a ``step_fn`` that runs one micro-batch (forward, backward,
optimizer step under ``accelerator.accumulate``); :func:`train_loop` owns the rest. Resuming is exact: a
checkpoint holds the models, optimizers, LR schedulers, EMA, RNG states and the data position, and the data
order is a pure function of (seed, epoch), so "5 steps, stop, resume 5" equals "10 steps". A run with a time
budget (``TrainConfig.budget_minutes``) follows its clock instead, which no two runs share.

Several processes (torchrun, ``accelerate launch``) split each global batch of ``train.batch_size`` rows between them
and draw its randomness together (``ldm.train.distributed``), so that they take the steps one process would; the main
process alone writes checkpoints, samples, logs and the result, and each process saves and restores its own RNG.

Checkpoints are one safetensors file each (never a pickle), written atomically: tensors under flat keys, the
rest of the state as JSON in the header.
"""

from __future__ import annotations

import enum
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ldm.config import to_dict
from ldm.errors import LdmError
from ldm.formats.bundle import package_versions
from ldm.io import remove_stale_temps, save_tensors
from ldm.runtime import check_memory
from ldm.train.distributed import (
    average_gradients,
    check_launch,
    check_processes,
    gather_objects,
    has_accelerator_device,
    hold_output,
    launch_from_env,
    main_process_object,
    mean_across_processes,
    per_process_batch,
)

T = TypeVar("T")


class Precision(enum.Enum):
    NO = "no"
    BF16 = "bf16"
    FP16 = "fp16"


class LRSchedule(enum.Enum):
    CONSTANT = "constant"  # after a linear warm-up
    COSINE = "cosine"  # cosine decay to 0 after the warm-up (Loshchilov & Hutter 2017)
    LINEAR = "linear"  # straight-line decay to 0 after the warm-up


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = "runs/train"
    batch_size: int = 16  # the global micro-batch: split evenly among the processes (train.lr is for this batch)
    gradient_accumulation: int = 1
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time of this invocation; 0 = no limit
    # The run's training time, summed over resumes: training stops when it is spent, and a cosine or linear
    # schedule decays over it as well as over max_steps (its progress is the larger of the two fractions), so it
    # reaches its end however fast the machine is. 0 = no budget. Resuming such a run repeats its steps only up to
    # the clock.
    budget_minutes: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    mixed_precision: Precision = Precision.NO
    ema_decay: float = 0.0  # 0 = no EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 500
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self):
        floats = {"lr": self.lr, "weight_decay": self.weight_decay, "grad_clip": self.grad_clip,
                  "ema_decay": self.ema_decay, "max_minutes": self.max_minutes, "budget_minutes": self.budget_minutes,
                  **{f"adam_betas[{i}]": b for i, b in enumerate(self.adam_betas)}}  # fmt: skip
        for name, value in floats.items():  # flags reach here without the YAML reader's check (--max-minutes nan)
            if not math.isfinite(value):
                raise ValueError(f"train.{name} must be a finite number, got {value}")
        for name in ("batch_size", "gradient_accumulation", "max_steps", "checkpoint_every", "log_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("train.ema_decay must be in [0, 1)")
        for name in ("max_minutes", "budget_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be at least 0 (0 = no limit)")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be a positive number, got {self.lr}; 1e-4 is usual")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"train.adam_betas must both be in [0, 1), got {list(self.adam_betas)}; [0.9, 0.999] is usual")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "keep_checkpoints", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be at least 0, got {getattr(self, name)}")


@dataclass
class Progress:
    """Where training stands: optimizer steps done, the next micro-batch of the current epoch, and the training
    time spent so far (seconds, summed over resumes)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0


SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)  # the weights or optimizer states are split up


def make_accelerator(cfg: TrainConfig, *, log_dir: Path | None = None) -> Accelerator:
    """The run's accelerator, checked against the launcher: the processes it started must be the ones accelerate
    sets up (several processes on a machine without GPUs run on its CPU, over gloo), and the global batch must
    split evenly among them. The main process prints what was set up, once."""
    launch = launch_from_env()
    check_launch(launch)
    cpu = launch.processes > 1 and not has_accelerator_device()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision.value,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        log_with="tensorboard" if log_dir is not None else None,
        project_dir=str(log_dir) if log_dir is not None else None,
        cpu=cpu,
    )
    kind = accelerator.distributed_type
    check_processes(launch, processes=accelerator.num_processes, kind=kind.value)
    per_process = per_process_batch(cfg.batch_size, accelerator.num_processes)
    if kind is DistributedType.FSDP and cfg.ema_decay > 0:
        raise LdmError("FSDP shards the weights the EMA averages; set --set train.ema_decay=0, or use DDP "
                       "(configs/accelerate/ddp-gpu.yaml) or DeepSpeed ZeRO-2, which keep them whole")  # fmt: skip
    if kind is DistributedType.DEEPSPEED:  # no DataLoader goes through prepare(): DeepSpeed is told the batch
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = per_process
    if kind in SHARDED and accelerator.is_main_process:
        print(f"note: under {kind.value} checkpoints keep the whole weights but not the optimizer states, which are "
              "split among the processes: a resumed run starts its Adam moments afresh")  # fmt: skip
    if accelerator.is_main_process and accelerator.num_processes > 1:
        mode = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(kind, "DDP")
        where = "the CPU (no GPU here)" if cpu else accelerator.device.type
        print(f"{accelerator.num_processes} processes on {where}, {mode} over {accelerator.state.backend}; global "
              f"batch {cfg.batch_size} = {accelerator.num_processes} × {per_process}; process 0 writes {cfg.output_dir}")  # fmt: skip
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if accelerator.is_main_process and precision not in ("no", cfg.mixed_precision.value):
        print(f"note: the launcher asked for {precision}, the run config says {cfg.mixed_precision.value}, which "
              "holds; set --set train.mixed_precision=... instead")  # fmt: skip
    return accelerator


def held_run(cfg: TrainConfig, body: Callable[[Accelerator], T], *,
             check: Callable[[Accelerator], None] | None = None) -> T:  # fmt: skip
    """A training script's run: its accelerator (:func:`make_accelerator`, logging to ``OUT/logs``), ``check`` of it,
    then ``body(accelerator)`` while this run holds its output folder (a second trainer there is refused), and the end
    of training on every process (the trackers close, the process group goes)."""
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, log_dir=out / "logs")
    if check is not None:
        check(accelerator)
    with hold_output(accelerator, out):
        result = body(accelerator)
    accelerator.end_training()
    return result


FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where make_optimizer picks torch's fused AdamW kernel


def make_optimizer(params, cfg: TrainConfig, *, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over parameters or param-group dicts, fused into one kernel per step where every parameter allows it
    (CPU or CUDA floats): on CPU the update of a 4M-parameter VAE takes a third of the time of the per-tensor loop,
    the same arithmetic."""
    params = [_listed(item) for item in params]  # a generator in a group would be spent by the check below
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(
        params, lr=lr or cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused or None
    )


def _listed(item):
    """A parameter as it is; a param-group dict with its ``params`` as a list."""
    if not isinstance(item, dict):
        return item
    members = item["params"]
    return item | {"params": [members] if isinstance(members, torch.Tensor) else list(members)}


@dataclass
class BudgetClock:
    """The fraction of ``train.budget_minutes`` spent, which :func:`train_loop` advances and the schedule reads."""

    spent: float = 0.0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, processes: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then constant, cosine or linear decay, in optimizer steps. With a time
    budget a decay's progress is the larger of the step fraction and the budget fraction
    (``scheduler.budget_clock``, set by :func:`train_loop`; warm-up time counts in it). ``processes``:
    ``accelerator.num_processes``; accelerate steps a prepared scheduler once per process at every optimizer step,
    which the factor divides out."""
    clock = BudgetClock()

    def factor(calls: int) -> float:
        step = calls // processes
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule is LRSchedule.CONSTANT:
            return 1.0
        done = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps), clock.spent))
        if cfg.lr_schedule is LRSchedule.COSINE:
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0 - done

    return _BudgetLR(optimizer, factor, clock)


class _BudgetLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR that carries the budget clock its factor reads; the clock is not part of its saved state
    (the time spent is :class:`Progress`'s)."""

    def __init__(self, optimizer, factor, clock: BudgetClock):
        self.budget_clock = clock
        super().__init__(optimizer, factor)

    def state_dict(self) -> dict:  # loading then leaves the clock in place: it is not in the state
        return {k: v for k, v in super().state_dict().items() if k != "budget_clock"}


ACTIVATION_COPIES = 6  # tensors of a level's size a step keeps per layer (conv, norm and activation outputs, both halves)


def check_training_size(*, side: int, factor: int, batch: int, channels: Sequence[int], layers: int, what: str,
                        input_scale: int = 1) -> None:  # fmt: skip
    """Refuse a training resolution (pixels) the model cannot take (not a multiple of ``factor``, the VAE's pixels
    per latent cell) or whose activations would not fit the memory limit: a rough upper bound of what a step keeps
    for the backward pass, from the batch, the model's input side (``side / input_scale``: pixels for the VAE,
    latent cells for the UNet) and the channels of each level (each a quarter the area of the one above)."""
    if side < factor or side % factor:
        fix = max(factor, side // factor * factor)
        raise LdmError(f"{what}: the resolution must be a positive multiple of {factor}, got {side}; try {fix}")
    cells = sum(c / 4**level for level, c in enumerate(channels))
    needed = 4 * batch * (side // input_scale) ** 2 * cells * (2 * layers + 2) * ACTIVATION_COPIES
    check_memory(needed, what=f"{what} at {side}×{side} px, batch {batch}",
                 fix="lower --resolution or train.batch_size")  # fmt: skip


def backward_step(
    accelerator: Accelerator, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, *,
    params=None, grad_clip: float = 0.0, unprepared=(),
) -> None:  # fmt: skip
    """One micro-batch's update, inside ``accelerator.accumulate``: backward, then at a gradient-sync step the
    averaging across processes of the gradients of ``unprepared`` (parameters of a module that is not a prepared,
    DDP-wrapped one), the clipping of ``params``' gradient norm to ``grad_clip`` (0 = off), the optimizer and LR
    scheduler steps and the zeroing of the gradients. Under accumulation accelerate's prepared optimizer and
    scheduler skip their steps between syncs, so calling this every micro-batch is right."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        average_gradients(accelerator, unprepared)
    if params is not None and accelerator.sync_gradients and grad_clip > 0:
        accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class LerpEMA(EMAModel):
    """diffusers' EMAModel (decay warm-up, state dict, copy_to, store/restore) with a cheaper update.

    EMAModel's update is ``s -= (1 - d)·(s - p)``: a temporary ``s - p`` per tensor, then a second pass. Here it is
    one ``lerp_`` per tensor, ``s += (1 - d)·(p - s)``, with no temporary: the same value up to rounding, in less
    than half the time on a CPU, where torch runs foreach ops tensor by tensor (bench/training.py, BENCHMARKS.md).
    """

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        trained = [(s, p) for s, p in zip(self.shadow_params, parameters, strict=True) if p.requires_grad]
        frozen = [(s, p) for s, p in zip(self.shadow_params, parameters) if not p.requires_grad]
        if frozen:
            torch._foreach_copy_([s for s, _ in frozen], [p for _, p in frozen])
        if trained:
            torch._foreach_lerp_([s for s, _ in trained], [p for _, p in trained], 1 - decay)


def make_ema(model: nn.Module, cfg: TrainConfig) -> EMAModel | None:
    return LerpEMA(model.parameters(), decay=cfg.ema_decay, foreach=True) if cfg.ema_decay > 0 else None


# --- data order ---------------------------------------------------------------------------------------------------


class EpochBatches:
    """Index batches for one epoch: a permutation seeded by (seed, epoch), cut into global batches of
    ``batch_size`` and split across processes.

    Global batch ``b`` covers ``perm[b·B : (b+1)·B]`` whatever the number of processes W; process ``r`` takes its
    ``r``-th slice of B / W. Incomplete final batches are dropped, so every process sees the same number of batches.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, num_replicas: int = 1, rank: int = 0):
        self.per_process = per_process_batch(batch_size, num_replicas)
        if size < batch_size:
            raise LdmError(
                f"the dataset has {size} usable items, fewer than one batch ({batch_size}); "
                "lower --set train.batch_size=N or add data"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank

    def __len__(self) -> int:
        return self.size // self.batch_size

    def epoch(self, epoch: int, *, start: int = 0) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=generator).tolist()
        lo = self.rank * self.per_process
        return [perm[b * self.batch_size + lo : b * self.batch_size + lo + self.per_process]
                for b in range(start, len(self))]  # fmt: skip


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``obj`` with every tensor moved into ``tensors`` under a flat key."""
    if prefix in tensors:
        raise ValueError(f"two checkpoint entries flatten to the key {prefix}")
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.copy())
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.#k{i}", tensors), _flatten(v, f"{prefix}.{k if isinstance(k, str) else f'#{i}'}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__ndarray__" in skeleton:
            return tensors[skeleton["__ndarray__"]].numpy()
        if "__tuple__" in skeleton:
            return tuple(_unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    return skeleton


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainingState:
    """Everything a checkpoint restores. Models, optimizers and schedulers are the accelerate-prepared objects."""

    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    emas: dict[str, EMAModel] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)


CHECKPOINT = re.compile(r"step-(\d{8})\.safetensors$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, state: TrainingState, output_dir: str | Path, *, config: Any, keep: int) -> Path | None:
    """Write ``checkpoints/step-NNNNNNNN.safetensors`` atomically (main process only) and prune old ones. Every
    process calls it: each one's RNG state goes in, and under FSDP or DeepSpeed the models' shards are gathered into
    whole weights (their optimizer states, split among the processes, are left out: a resumed run starts its Adam
    moments afresh)."""
    accelerator.wait_for_everyone()
    rngs = gather_objects(accelerator, rng_state())
    models = _model_states(accelerator, state.models)
    if not accelerator.is_main_process:
        return None
    sharded = accelerator.distributed_type in SHARDED
    tensors: dict[str, torch.Tensor] = {}
    payload = {
        "models": models,
        "optimizers": {} if sharded else {k: o.state_dict() for k, o in state.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in state.schedulers.items()},
        "emas": {k: e.state_dict() for k, e in state.emas.items()},
        "rng": rngs[0],
        "progress": vars(state.progress).copy(),
    }
    if len(rngs) > 1:
        payload["rng_others"] = rngs[1:]  # processes 1, 2, …: each resumes with its own
    skeleton = _flatten(payload, "s", tensors)
    meta = {
        "ldm.checkpoint": json.dumps(skeleton),
        "ldm.config": json.dumps(to_dict(config)),
        "ldm.packages": json.dumps(package_versions()),
    }
    folder = checkpoint_dir(output_dir)
    path = save_tensors(folder / f"step-{state.progress.step:08d}.safetensors", tensors, metadata=meta)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def _model_states(accelerator: Accelerator, models: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's checkpoint entry, on the main process ({} elsewhere). Under FSDP and DeepSpeed accelerate
    gathers the shards into whole tensors (a collective: every process calls this); of a module that keeps only
    its trained parameters, those. Otherwise the unwrapped module's own."""
    if accelerator.distributed_type not in SHARDED:
        if not accelerator.is_main_process:
            return {}
        return {k: _trainable_state(accelerator.unwrap_model(m)) for k, m in models.items()}
    states = {}
    for name, model in models.items():
        whole = accelerator.get_state_dict(model)
        module = accelerator.unwrap_model(model)
        if hasattr(module, "trainable_state_dict"):
            trained = {n.replace("_fsdp_wrapped_module.", "") for n, p in module.named_parameters() if p.requires_grad}
            whole = {k: v for k, v in whole.items() if k in trained}
        states[name] = whole
    return states if accelerator.is_main_process else {}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    return sorted(p for p in folder.glob("step-*.safetensors") if CHECKPOINT.search(p.name)) if folder.is_dir() else []


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` → the newest checkpoint in ``output_dir`` (None when there is none yet); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise LdmError(f"checkpoint {path} not found; pass --resume latest or a file under {checkpoint_dir(output_dir)}")
    return path


def load_checkpoint(path: Path, accelerator: Accelerator, state: TrainingState, *, config: Any) -> None:
    """Restore ``state`` in place from a checkpoint written by :func:`save_checkpoint` for the same config."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise LdmError(f"cannot read checkpoint {path} ({exc}); delete it to resume from the one before") from None
    if "ldm.checkpoint" not in meta:
        raise LdmError(f"{path} is not an ldm training checkpoint")
    saved_config = json.loads(meta.get("ldm.config", "null"))
    if saved_config is not None and _model_part(saved_config) != _model_part(to_dict(config)):
        raise LdmError(f"{path} was written for a different model config; resume with the config it was trained with")
    payload = _unflatten(json.loads(meta["ldm.checkpoint"]), tensors)
    for name, model in state.models.items():
        model = accelerator.unwrap_model(model)
        getattr(model, "load_trainable_state_dict", model.load_state_dict)(payload["models"][name])
    for name, optimizer in state.optimizers.items():
        if name in payload["optimizers"]:
            optimizer.load_state_dict(payload["optimizers"][name])
        elif accelerator.is_main_process:
            print(f"note: {path} holds no {name} optimizer state (an FSDP or DeepSpeed run's); its Adam moments start "
                  "afresh")  # fmt: skip
    for name, scheduler in state.schedulers.items():
        scheduler.load_state_dict(payload["schedulers"][name])
    for name, ema in state.emas.items():
        ema.load_state_dict(payload["emas"][name])
        ema.to(device=accelerator.device)  # the checkpoint's tensors load on the CPU; the shadow follows the model
    per_process = [payload["rng"], *payload.get("rng_others", [])]
    if len(per_process) == accelerator.num_processes:
        set_rng_state(per_process[accelerator.process_index])
    else:  # every process draws the global batch's randomness alike: the main process's state serves them all
        set_rng_state(payload["rng"])
        if accelerator.is_main_process:
            print(f"note: {path} was written by {len(per_process)} process(es), resumed by "
                  f"{accelerator.num_processes}: each continues from process 0's random state")  # fmt: skip
    state.progress = Progress(**payload["progress"])


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a module: a loss module's frozen, user-supplied backbone is left out."""
    return getattr(model, "trainable_state_dict", model.state_dict)()


def _model_part(config: dict) -> Any:
    """The part of a run config that must match to resume (the model's shape), ignoring run-length settings."""
    return config.get("model") if isinstance(config, dict) else config


# --- run set-up shared by the training scripts -------------------------------------------------------------------


def begin_run(accelerator: Accelerator, state: TrainingState, *, config: Any, resume: Path | None, output_dir: Path,
              name: str) -> None:  # fmt: skip
    """Remove the temp files that killed writes left in ``output_dir``, restore ``state`` from the checkpoint
    ``resume`` (from :func:`resolve_resume`, called early so that a wrong path fails before any work), write
    ``OUT/config.yaml`` and start TensorBoard logging."""
    if accelerator.is_main_process and (stale := remove_stale_temps(output_dir)):
        print(f"removed {len(stale)} temp file(s) that interrupted writes left in {output_dir}, e.g. {stale[0].name}")
    path = main_process_object(accelerator, None if resume is None else str(resume))  # all resume the same one
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LdmError(f"process {accelerator.process_index} cannot read {path}; every process must see the output "
                           "folder (on several machines: a shared file system)")  # fmt: skip
        load_checkpoint(path, accelerator, state, config=config)
        if accelerator.is_main_process:
            print(f"resumed from {path} at step {state.progress.step}")
    if accelerator.is_main_process:
        from ldm.config import dump_yaml
        from ldm.io import write_text

        write_text(output_dir / "config.yaml", dump_yaml(config))
        accelerator.init_trackers(name)


# --- logging and samples ------------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, *, columns: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → (3, rows·H, columns·W)."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * h, columns * w, dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from ldm.images import save_png

    save_png(path, grid)


def log_grid(accelerator: Accelerator, tag: str, grid: torch.Tensor, step: int, output_dir: Path) -> Path:
    """A sample grid as PNG under ``samples/`` and as a TensorBoard image."""
    path = output_dir / "samples" / f"{tag}-{step:08d}.png"
    save_grid(grid, path)
    tracker = _tensorboard(accelerator)
    if tracker is not None:
        tracker.add_image(tag, grid.clamp(0, 1), step)
    return path


def _tensorboard(accelerator: Accelerator):
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            return tracker.writer
    return None


# --- the loop -----------------------------------------------------------------------------------------------------


StepFn = Callable[[dict, int], dict[str, float]]


def _collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def batches(dataset, order: EpochBatches, epoch: int, *, start: int, num_workers: int) -> Iterator[dict]:
    """The epoch's micro-batches from ``start`` on; item randomness is seeded by (seed, epoch, index)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    # The loader's own generator: creating an iterator must not draw from the global RNG, or a resumed run
    # (which creates one more iterator than a straight run) would drift.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=order.epoch(epoch, start=start),
        num_workers=num_workers,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(order.seed * 1_000_003 + epoch),
    )
    yield from loader


def train_loop(
    *,
    accelerator: Accelerator,
    cfg: TrainConfig,
    state: TrainingState,
    dataset,
    step_fn: StepFn,
    config: Any,
    sample_fn: Callable[[int], None] | None = None,
    ema_models: Sequence[tuple[EMAModel, nn.Module]] = (),
    batch_order=None,
) -> Progress:
    """Run until ``cfg.max_steps`` optimizer steps, ``cfg.max_minutes`` of this call or ``cfg.budget_minutes`` of
    the whole run; checkpoint on the way and at the end. Under several processes the main process's clock decides,
    so that every process stops after the same step and sees the same learning rate.

    ``step_fn(batch, step)`` runs one micro-batch and returns float losses for logging. An optimizer step has
    happened when ``accelerator.sync_gradients`` is true afterwards. ``sample_fn(step)`` runs every
    ``cfg.sample_every`` steps but not at the step training stops on: the caller samples or validates the final
    weights (EMA copied in) after the loop, once. ``batch_order`` replaces the default
    :class:`EpochBatches` (e.g. aspect-ratio buckets); it needs ``.seed``, ``len()`` and ``.epoch(epoch, start=)``.
    """
    output_dir = Path(cfg.output_dir)
    order = batch_order if batch_order is not None else EpochBatches(
        len(dataset), cfg.batch_size, seed=cfg.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    progress = state.progress
    clocks = [clock for s in state.schedulers.values() if (clock := _budget_clock(s)) is not None]
    started, spent_before = time.monotonic(), progress.seconds
    budget_s = cfg.budget_minutes * 60  # 0: no budget
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="training", disable=not accelerator.is_main_process)
    running: dict[str, list[float]] = {}

    def budget_spent() -> bool:
        """Set the schedules' clocks from ``progress.seconds``; True when the budget is used up."""
        for clock in clocks:
            clock.spent = progress.seconds / budget_s if budget_s else 0.0
        return budget_s > 0 and progress.seconds >= budget_s

    def tick() -> bool:
        """Advance the training clock after an optimizer step; True when time is up."""
        elapsed = time.monotonic() - started
        if cfg.max_minutes > 0 or budget_s:  # the main process's clock decides for all
            elapsed = _main_process_value(accelerator, elapsed)
        progress.seconds = spent_before + elapsed
        return budget_spent() or (cfg.max_minutes > 0 and elapsed > cfg.max_minutes * 60)

    # A resumed run's schedule continues from the time already spent; a spent budget trains no more.
    stop = budget_spent() or progress.step >= cfg.max_steps
    while not stop:
        for batch in batches(dataset, order, progress.epoch, start=progress.batch_in_epoch, num_workers=cfg.num_workers):
            logs = step_fn(batch, progress.step)
            progress.batch_in_epoch += 1
            for key, value in logs.items():
                if not math.isfinite(value):
                    raise LdmError(
                        f"{key} became {value} at step {progress.step}; lower --set train.lr, use fp32 or bf16 rather "
                        f"than fp16, and resume from the last checkpoint in {checkpoint_dir(output_dir)}"
                    )
                running.setdefault(key, []).append(value)
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            for ema, model in ema_models:
                ema.step(accelerator.unwrap_model(model).parameters())
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                means = mean_across_processes(accelerator, {k: sum(v) / len(v) for k, v in running.items()})
                for name, scheduler in state.schedulers.items():
                    means[f"lr/{name}"] = scheduler.get_last_lr()[0]
                accelerator.log(means, step=progress.step)
                postfix = {k: f"{v:.4g}" for k, v in means.items() if not k.startswith("lr/")}
                if cfg.budget_minutes > 0:  # the step bar's total is only an upper bound then
                    postfix["budget"] = f"{progress.seconds / 60:.1f}/{cfg.budget_minutes:g} min"
                bar.set_postfix(postfix)
                running.clear()
            out_of_time = tick()
            stop = progress.step >= cfg.max_steps or out_of_time
            if sample_fn is not None and not stop and progress.step % cfg.sample_every == 0:
                sample_fn(progress.step)  # not at the last step: the caller validates the final weights once
            if stop or progress.step % cfg.checkpoint_every == 0:
                save_checkpoint(accelerator, state, output_dir, config=config, keep=cfg.keep_checkpoints)
            if stop:
                break
        else:
            progress.epoch += 1
            progress.batch_in_epoch = 0
    bar.close()
    return progress


def _budget_clock(scheduler) -> BudgetClock | None:
    """The budget clock of a scheduler from :func:`make_lr_scheduler`, through accelerate's wrapper."""
    return getattr(getattr(scheduler, "scheduler", scheduler), "budget_clock", None)


def _main_process_value(accelerator: Accelerator, value: float) -> float:
    """``value`` as the main process has it (a broadcast when there are several processes)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast

    return float(broadcast(torch.tensor([value], dtype=torch.float64, device=accelerator.device), from_process=0).item())
