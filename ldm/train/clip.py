"""Train a small CLIP from scratch on a captioned image folder and put its text tower into a bundle.

The model is open_clip's ``CLIP`` with random weights (nothing is downloaded): a small ViT image tower
(``model.vision``) and a text tower of exactly the bundle's (or preset's) text-encoder shape, trained with
open_clip's ``ClipLoss`` (symmetric InfoNCE over the batch, learnable temperature clamped at ``max_logit_scale``).
Captions are tokenized by the pipeline's own tokenizer and pad id. At the end:

    OUT/bundle/          the input bundle (VAE, UNet, tokenizer) with the trained text encoder and a copy of
                         clip.safetensors (the default scorer of ``python -m ldm eval``); from a preset, a
                         new bundle whose other parts are freshly initialised
    OUT/clip.safetensors the whole CLIP, image tower included, config in the metadata (``ldm.models.clip.load_clip``)
    OUT/eval.json        held-out image→text and text→image top-1/top-5 retrieval accuracy

Contrastive negatives are the other items of the same global micro-batch (``train.batch_size``; several processes
gather each other's embeddings): gradient accumulation does not enlarge them.
:func:`run` is the whole run, in the order of its named steps: the data, the base bundle, the model and what trains
it, the step, the held-out retrieval, the end.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from open_clip.loss import ClipLoss
from torch import nn

from ldm.data import CaptionedImageDataset, DataConfig, held_out, report_dataset
from ldm.errors import LdmError
from ldm.formats.bundle import CLIP_FILE, Bundle, create_bundle, load_bundle, save_bundle
from ldm.io import write_json
from ldm.models.clip import (
    CLIPModelConfig,
    ContrastivePair,
    VisionTowerConfig,
    build_clip,
    encode_text,
    parameter_groups,
    retrieval_metrics,
    save_clip,
    text_encoder_from_clip,
)
from ldm.models.presets import ModelConfig, get_preset
from ldm.models.tokenizer import build_tokenizer, tokenize
from ldm.train.distributed import scan_share
from ldm.train.loop import (
    LRSchedule,
    Progress,
    StepFn,
    TrainConfig,
    TrainingState,
    backward_step,
    begin_run,
    held_run,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
    train_loop,
)

# open_clip's recipe scaled down: AdamW (β2 0.98), wd 0.1 off gains/biases, cosine after a warm-up.
# Held-out retrieval is measured every train.sample_every steps and at the end.
CLIP_TRAIN = TrainConfig(
    output_dir="runs/clip", batch_size=64, lr=5e-4, adam_betas=(0.9, 0.98), weight_decay=0.1,
    lr_schedule=LRSchedule.COSINE, warmup_steps=200, max_steps=4000, grad_clip=1.0,
    checkpoint_every=500, sample_every=500,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CLIPRunConfig:
    # Text tower = the bundle's (or preset's) text encoder; vision tower and joint width are ours. None: that text
    # tower and a default vision tower at data.resolution (filled in by with_model).
    model: CLIPModelConfig | None = None
    data: DataConfig
    train: TrainConfig = CLIP_TRAIN
    bundle: str = ""  # bundle whose text encoder is replaced; its VAE, UNet and tokenizer are carried over
    preset: str = ""  # without a bundle: the preset whose other parts a new bundle is created from
    eval_data: str = ""  # held-out folder: retrieval accuracy; "": the data's test/ split, where it has one
    eval_batch_size: int = 256
    max_logit_scale: float = 100.0  # the learnable temperature is clamped to exp(logit_scale) ≤ this (open_clip)
    name: str = ""  # the written bundle's name; "" = the bundle's, or the preset's

    def __post_init__(self):
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be at least 1")
        if self.max_logit_scale <= 1:
            raise ValueError("max_logit_scale must be above 1")


def bundle_config(path: str) -> ModelConfig:
    """The model config of the bundle at ``path``, with a message that says what to pass when there is none."""
    if not (Path(path) / "manifest.json").is_file():
        raise LdmError(
            f"no model bundle at {path}; pass --bundle with a bundle folder (e.g. runs/vae-emoji/bundle, which "
            "train_vae.py writes) or --preset NAME to start a new one"
        )
    return load_bundle(path, verify=False).config


def source_model(cfg: CLIPRunConfig) -> ModelConfig:
    """The model config whose text encoder is trained: the bundle's, else the preset's."""
    if cfg.bundle and cfg.preset:
        raise LdmError("pass --bundle BUNDLE or --preset NAME, not both (a bundle already fixes the text config)")
    if cfg.bundle:
        return bundle_config(cfg.bundle)
    if cfg.preset:
        return get_preset(cfg.preset)
    raise LdmError("pass --bundle BUNDLE to train its text encoder, or --preset NAME when there is no bundle yet")


def with_model(cfg: CLIPRunConfig) -> CLIPRunConfig:
    """``cfg`` with its model filled in when the run config leaves it out: the source's text tower and a vision
    tower at data.resolution."""
    if cfg.model is not None:
        return cfg
    vision = VisionTowerConfig(image_size=cfg.data.resolution)
    return replace(cfg, model=CLIPModelConfig(text=source_model(cfg).text_encoder, vision=vision))


def check_config(cfg: CLIPRunConfig) -> None:
    """What the types cannot say; raised before any training so a bad run fails in seconds."""
    if cfg.model.vision.image_size != cfg.data.resolution:
        raise LdmError(
            f"model.vision.image_size ({cfg.model.vision.image_size}) must equal data.resolution "
            f"({cfg.data.resolution}); set them equal, e.g. --set model.vision.image_size={cfg.data.resolution}"
        )
    if bool(cfg.bundle) == bool(cfg.preset):
        raise LdmError("the run config needs exactly one of bundle and preset; pass --bundle BUNDLE or --preset NAME")
    if cfg.preset:
        try:
            replace(get_preset(cfg.preset), text_encoder=cfg.model.text)
        except ValueError as exc:
            raise LdmError(f"model.text does not fit preset {cfg.preset}: {exc}") from None


# --- held-out retrieval -------------------------------------------------------------------------------------------


def token_ids_for(tokenizer, captions: list[str], cfg: CLIPModelConfig) -> torch.Tensor:
    """(N, context_length) ids, exactly as the pipeline tokenizes prompts."""
    return tokenize(tokenizer, captions, context_length=cfg.text.context_length, pad_id=cfg.text.pad_id)


@torch.no_grad()
def evaluate(clip, images: torch.Tensor, ids: torch.Tensor, captions: list[str], *, batch_size: int, device) -> dict:
    """Held-out retrieval metrics and the contrastive loss over the whole split as one batch.

    ``images``: (N, 3, S, S) in [-1, 1]; ``ids``: (N, L) token ids; ``captions``: N strings (duplicates share a
    positive). The model is put back in the mode it was in.
    """
    was_training = clip.training
    clip.eval()
    image_f, text_f = [], []
    for start in range(0, len(images), batch_size):
        image_f.append(clip.encode_image(images[start : start + batch_size].to(device), normalize=True).float().cpu())
        text_f.append(encode_text(clip, ids[start : start + batch_size].to(device), normalize=True).float().cpu())
    clip.train(was_training)
    image_features, text_features = torch.cat(image_f), torch.cat(text_f)  # (N, E) each
    metrics = retrieval_metrics(image_features, text_features, captions=captions)
    scale = clip.logit_scale.exp().float().cpu()
    metrics["loss"] = ClipLoss()(image_features, text_features, scale).item()
    metrics["chance_top1"], metrics["chance_top5"] = min(1.0, 1 / len(images)), min(1.0, 5 / len(images))
    return metrics


def format_metrics(m: dict) -> str:
    return (
        f"held-out retrieval over {m['n']} pairs: image→text top-1 {m['image_to_text_top1']:.3f} "
        f"top-5 {m['image_to_text_top5']:.3f}, text→image top-1 {m['text_to_image_top1']:.3f} "
        f"top-5 {m['text_to_image_top5']:.3f} (chance {m['chance_top1']:.3f} / {m['chance_top5']:.3f}), "
        f"loss {m['loss']:.4f}"
    )


@dataclass
class HeldOutPairs:
    """The held-out split, ready to score: (M, 3, S, S) images in [-1, 1], (M, L) token ids, and the captions."""

    images: torch.Tensor
    ids: torch.Tensor
    captions: list[str]


def retrieval_fn(cfg: CLIPRunConfig, clip: nn.Module, held: HeldOutPairs | None, *,
                 accelerator: Accelerator) -> Callable[[int], dict]:  # fmt: skip
    """``score(step)``: held-out retrieval, logged as ``eval/…`` and returned (main process only; {} elsewhere or
    without a held-out split). It draws nothing from the global RNG, so resuming stays exact."""

    def score(step: int) -> dict:
        if held is None or not accelerator.is_main_process:
            return {}
        metrics = evaluate(clip, held.images, held.ids, held.captions, batch_size=cfg.eval_batch_size,
                           device=accelerator.device)  # fmt: skip
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        return metrics

    return score


# --- the run --------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a run leaves behind (on the main process; elsewhere the progress alone)."""

    progress: Progress
    bundle_dir: Path | None = None
    clip_path: Path | None = None
    metrics: dict = field(default_factory=dict)  # held-out retrieval, as in OUT/eval.json


def run(cfg: CLIPRunConfig, *, resume: str | None = None) -> RunResult:
    """Train as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from the start), and
    write ``OUT/clip.safetensors``, ``OUT/bundle`` and, with eval_data, ``OUT/eval.json``."""
    cfg = with_model(cfg)
    check_config(cfg)
    out = Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, out)
    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume_path=resume_path))


def _run(cfg: CLIPRunConfig, accelerator: Accelerator, *, resume_path: Path | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    out = Path(cfg.train.output_dir)
    dataset, eval_set = datasets(cfg, accelerator)
    base = load_base(cfg)
    tokenizer = base.tokenizer if base is not None else build_tokenizer(context_length=cfg.model.text.context_length)
    train_ids = token_ids_for(tokenizer, dataset.captions, cfg.model)  # (N, L)
    torch.manual_seed(cfg.train.seed)
    clip = build_clip(cfg.model)
    if accelerator.is_main_process:
        print(f"CLIP: image tower {sum(p.numel() for p in clip.visual.parameters()) / 1e6:.2f}M, "
              f"total {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters")  # fmt: skip
    model, optimizer, scheduler, ema = build_trainables(cfg, clip, accelerator)
    state = TrainingState(models={"clip": model}, optimizers={"clip": optimizer}, schedulers={"clip": scheduler},
                          emas={"clip": ema} if ema else {}, progress=Progress())  # fmt: skip
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_clip")

    held = None
    if eval_set is not None:
        images = torch.stack([eval_set[i]["pixel_values"] for i in range(len(eval_set))])  # (M, 3, S, S)
        held = HeldOutPairs(images, token_ids_for(tokenizer, eval_set.captions, cfg.model), eval_set.captions)
    score = retrieval_fn(cfg, clip, held, accelerator=accelerator)
    step_fn = step_function(cfg, clip, model, optimizer, scheduler, train_ids, accelerator=accelerator)
    train_loop(accelerator=accelerator, cfg=cfg.train, state=state, dataset=dataset, step_fn=step_fn, config=cfg,
               sample_fn=score, ema_models=[(ema, model)] if ema else [])  # fmt: skip
    accelerator.wait_for_everyone()
    result = RunResult(progress=state.progress)
    if accelerator.is_main_process:
        finish(cfg, base, clip, ema, score, result, accelerator=accelerator)
    return result


def _duplicates(captions: list[str]) -> int:
    return sum(c for c in Counter(captions).values() if c > 1)


def datasets(
    cfg: CLIPRunConfig, accelerator: Accelerator
) -> tuple[CaptionedImageDataset, CaptionedImageDataset | None]:
    """The training pairs after the data report, and the held-out pairs (None without eval_data or a test split of
    the data, see :func:`~ldm.data.held_out`); notes on captions
    that several items share (false negatives in a batch)."""
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    report = report_dataset(cfg.data, quiet=not accelerator.is_main_process, share=scan_share(accelerator))
    dataset = CaptionedImageDataset(cfg.data, report=report, seed=cfg.train.seed)
    if dup := _duplicates(dataset.captions):
        say(f"note: {dup} training items share their caption with another; in a batch they are false negatives")
    eval_set = None
    if (held := held_out(cfg.data, cfg.eval_data)) is not None:
        eval_set = CaptionedImageDataset(held)
        dup = _duplicates(eval_set.captions)
        where = cfg.eval_data or f"the {held.split} split of {held.path}"
        say(f"held-out: {len(eval_set)} pairs in {where}" + (f" ({dup} with a shared caption)" if dup else ""))
    return dataset, eval_set


def load_base(cfg: CLIPRunConfig) -> Bundle | None:
    """The bundle whose text encoder is replaced (None from a preset), checked against ``model.text``."""
    if not cfg.bundle:
        return None
    bundle_config(cfg.bundle)  # a clear message when it is missing
    base = load_bundle(cfg.bundle)
    if base.config.text_encoder != cfg.model.text:
        raise LdmError(
            f"bundle {cfg.bundle} has a different text encoder than model.text of this run; "
            "start a new --out for it or pass the bundle the run was started with"
        )
    return base


def build_trainables(
    cfg: CLIPRunConfig, clip: nn.Module, accelerator: Accelerator
) -> tuple[nn.Module, torch.optim.Optimizer, object, EMAModel | None]:
    """The accelerate-prepared :class:`ContrastivePair`, its AdamW (no decay on gains and biases) and LR schedule,
    and the CLIP's EMA."""
    model = ContrastivePair(clip).train()
    optimizer = make_optimizer(parameter_groups(model, cfg.train.weight_decay), cfg.train)
    scheduler = make_lr_scheduler(optimizer, cfg.train, processes=accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler, make_ema(clip, cfg.train)


def step_function(cfg: CLIPRunConfig, clip: nn.Module, model: nn.Module, optimizer, scheduler,
                  train_ids: torch.Tensor, *, accelerator: Accelerator) -> StepFn:  # fmt: skip
    """One micro-batch: the symmetric contrastive loss over the batch, an update, the temperature clamped."""
    loss_fn = ClipLoss(rank=accelerator.process_index, world_size=accelerator.num_processes, gather_with_grad=True)
    max_log_scale = math.log(cfg.max_logit_scale)

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        images = batch["pixel_values"].to(accelerator.device)  # (B, 3, S, S) in [-1, 1]
        ids = train_ids[torch.tensor(batch["index"])].to(accelerator.device)  # (B, L)
        with accelerator.accumulate(model):
            image_features, text_features, logit_scale = model(images, ids)
            loss = loss_fn(image_features, text_features, logit_scale)
            backward_step(accelerator, loss, optimizer, scheduler, params=model.parameters(),
                          grad_clip=cfg.train.grad_clip)  # fmt: skip
            if accelerator.sync_gradients:
                with torch.no_grad():
                    clip.logit_scale.clamp_(0, max_log_scale)
        return {"loss": loss.item(), "logit_scale": logit_scale.item()}

    return step_fn


# --- the end --------------------------------------------------------------------------------------------------------


def finish(cfg: CLIPRunConfig, base: Bundle | None, clip: nn.Module, ema, score, result: RunResult, *,
           accelerator: Accelerator) -> None:  # fmt: skip
    """The EMA weights into the CLIP, the final held-out retrieval (once, ``OUT/eval.json``), ``OUT/clip.safetensors``
    and ``OUT/bundle`` with the trained text tower (from a preset: a new bundle around it)."""
    out, step = Path(cfg.train.output_dir), result.progress.step
    if ema is not None:
        ema.copy_to(clip.parameters())  # the CLIP and the bundle get the EMA weights
    clip.eval()
    result.metrics = score(step)
    if result.metrics:
        write_json(out / "eval.json", {"step": step, **result.metrics})
        print(format_metrics(result.metrics))
    clip = clip.float().cpu()
    result.clip_path = save_clip(clip, cfg.model, out / CLIP_FILE, extra={"step": step})
    text_encoder = text_encoder_from_clip(clip, cfg.model.text)
    if base is None:
        model_config = replace(get_preset(cfg.preset), text_encoder=cfg.model.text)
        base = create_bundle(model_config, seed=cfg.train.seed, name=cfg.preset)
    # The bundle carries the whole CLIP too: `python -m ldm eval` scores with it by default.
    extras = {**base.extras, CLIP_FILE: result.clip_path}
    written = replace(base, text_encoder=text_encoder, extras=extras, name=cfg.name or base.name)
    result.bundle_dir = save_bundle(written, out / "bundle")
    print(f"CLIP written to {result.clip_path}; bundle with the trained text encoder written to {out / 'bundle'}")
