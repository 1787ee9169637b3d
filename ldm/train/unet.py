"""Train the UNet of a bundle on its frozen VAE's latents, conditioned on its text encoder, into a new bundle.

Loss: mean-squared error of the UNet's ε or v prediction (``model.schedule.prediction``, the bundle's unless the run
config changes it; the new bundle records it), weighted per sample by Min-SNR-γ (Hang et al. 2023;
``loss.min_snr_gamma``, 0 = off), with optional offset noise (``loss.noise_offset``) and caption dropout for
classifier-free guidance (``loss.caption_dropout``). Latents are posterior samples of the VAE times its scaling factor
from the bundle config. VAE posteriors and caption hidden states are cached (see ``ldm.train.cache``) unless
``cache.enabled`` is false. ``lora.rank`` > 0 trains LoRA adapters only and writes ``OUT/lora.safetensors`` (and its
kohya twin ``OUT/lora.kohya.safetensors``). ``dreambooth.class_data`` adds DreamBooth's prior preservation
(``ldm.train.dreambooth``): class images beside the subject's in every batch, and their loss term.

``task`` inpaint or upscale trains, from a text-to-image bundle, a UNet that also reads a masked image or a
low-resolution one (the inputs: ``ldm.train.tasks``); its UNet starts as the base's, the new input channels of
``conv_in`` and the noise-level embedding zero (``ldm.models.unet.widen_for_task``). A bundle of that task already is
trained on as it is.

:func:`run` is the whole run, in the order of its named steps: the base bundle, the training data, the held-out set,
what is trained, the step, the validation, the end (the final validation, ``OUT/eval.json`` and the bundle).
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import nn

from ldm.data import DataConfig, ScanReport, held_out, report_dataset
from ldm.data.dataset import read_scanned_image
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle, load_bundle, save_bundle
from ldm.images import fit_tensor, signed_to_unit
from ldm.models.labels import Conditioning, LabelEncoder, build_label_encoder
from ldm.models.presets import ModelConfig, Task
from ldm.models.tokenizer import tokenize
from ldm.models.unet import widen_for_task
from ldm.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Request, generate
from ldm.pipeline.schedule import get_sampler
from ldm.train.cache import (
    BucketBatches,
    BucketConfig,
    CacheConfig,
    FeatureCache,
    UNetItems,
    assign_buckets,
    bucket_step,
    cache_path,
    load_or_build_cache,
    make_buckets,
)
from ldm.train.distributed import BatchShard, batch_shard, scan_share
from ldm.train.dreambooth import DreamBoothConfig, PriorBatches, batch_loss, check_dreambooth, with_class_images
from ldm.train.loop import (
    EpochBatches,
    LRSchedule,
    Progress,
    StepFn,
    TrainConfig,
    TrainingState,
    backward_step,
    begin_run,
    check_training_size,
    held_run,
    image_grid,
    log_grid,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
    train_loop,
)
from ldm.train.objectives import (
    add_noise,
    alphas_cumprod,
    min_snr_weights,
    offset_noise,
    sample_timesteps,
    timestep_bucket_edges,
    training_target,
    weighted_mse,
)
from ldm.train.tasks import (
    Condition,
    TaskInputConfig,
    downsample,
    make_condition,
    masked_image,
    random_masks,
    unet_input,
)

# --- the run config -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    min_snr_gamma: float = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); 0 = off
    noise_offset: float = 0.0  # offset-noise strength; 0 = off (0.05–0.1 is usual)
    caption_dropout: float = 0.1  # share of captions replaced by '' (classifier-free guidance)

    def __post_init__(self):
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be ≥ 0 (0 = off), got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be ≥ 0, got {self.noise_offset}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 0  # 0 = full fine-tune; R > 0 trains rank-R LoRA adapters on to_q, to_k, to_v, to_out.0 only
    alpha: float = 0.0  # LoRA α (the update is scaled by α / rank); 0 = rank
    merge_bundle: bool = False  # also write OUT/bundle with the adapters merged in (a full-size copy)

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"rank must be ≥ 0 (0 = full fine-tune), got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0, got {self.alpha}")


@dataclass(frozen=True, kw_only=True)
class TextualInversionConfig:
    """Train one new word's vectors instead of the UNet (``ldm.train.textual_inversion``): on when ``token`` is set."""

    token: str = ""  # the word; "" = off (a UNet run)
    init_word: str = "*"  # the vectors start as this text's token embeddings
    num_vectors: int = 1  # vectors the word stands for (A1111's vectors per token)
    template: str = "{token}, {caption}"  # a training caption that does not name the token becomes this

    def __post_init__(self):
        if self.token and not re.fullmatch(r"[^\s()\[\]:<>\\/]+", self.token):
            raise ValueError(f"textual_inversion.token must be one word without brackets, colons or slashes (a file "
                             f"name and a prompt word), got {self.token!r}; e.g. my-style")  # fmt: skip
        if self.num_vectors < 1:
            raise ValueError(f"textual_inversion.num_vectors must be at least 1, got {self.num_vectors}")
        if not self.init_word.strip():
            raise ValueError("textual_inversion.init_word must be a word, e.g. person or style")
        try:
            filled = self.template.format(token="\0", caption="")
        except (KeyError, IndexError, ValueError):
            filled = ""
        if "\0" not in filled:
            raise ValueError(f"textual_inversion.template must hold {{token}} (and may hold {{caption}}), got "
                             f"{self.template!r}")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    prompts: tuple[str, ...] = ()  # () = the first num_prompts distinct captions of the training data
    num_prompts: int = 4
    seed: int = 0  # image i uses seed + i; the held-out noise is drawn from this seed too
    # generate.py's defaults, so the grids show what the bundle will draw for users
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER
    timestep_buckets: int = 5  # held-out loss reported per this many ranges of t
    eval_images: int = 64  # at most this many held-out images
    noise_level: int = 20  # task upscale: the noise level of the grids' low-res inputs (generate.py's default)

    def __post_init__(self):  # checked when the config is read, not at the first validation mid-run
        for name, fix in (("num_prompts", 4), ("steps", 20), ("timestep_buckets", 5), ("eval_images", 64)):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be at least 1, got {getattr(self, name)}; try {fix}")
        if self.noise_level < 0:  # its upper bound, the UNet's noise levels, is checked against the model
            raise ValueError(f"validation.noise_level must be at least 0, got {self.noise_level}; try 20")
        if self.guidance_scale < 0:
            raise ValueError(
                f"validation.guidance_scale must be at least 0 (≤ 1: no guidance), got {self.guidance_scale}"
            )
        try:
            get_sampler(self.sampler)
        except LdmError as exc:
            raise ValueError(f"validation.sampler: {exc}") from None


UNET_TRAIN = TrainConfig(
    output_dir="runs/unet", batch_size=16, lr=1e-4, weight_decay=1e-2, lr_schedule=LRSchedule.COSINE,
    warmup_steps=500, max_steps=20000, ema_decay=0.9999, checkpoint_every=1000, sample_every=1000,
)  # fmt: skip


class LabelSource(enum.Enum):
    """Where a class-conditional run reads each image's class."""

    CAPTION = "caption"  # the caption (a dataset's caption column, or its sidecar .txt)
    FOLDER = "folder"  # the name of the folder the image is in (an imagefolder of class folders)


@dataclass(frozen=True, kw_only=True)
class UNetRunConfig:
    # The bundle's, made over for the task (None: filled in from it by with_model); only model.schedule may differ:
    # what the UNet is trained for.
    model: ModelConfig | None = None
    data: DataConfig
    bundle: str  # the bundle whose UNet is trained (and whose VAE, text encoder, tokenizer are used)
    # What the UNet learns: text_to_image, inpaint or upscale (by upscale_factor; data.resolution is the output's)
    task: Task = Task.TEXT_TO_IMAGE
    upscale_factor: int = 2  # task upscale: output side / input side
    task_inputs: TaskInputConfig = field(default_factory=TaskInputConfig)  # inpaint masks, upscale noise levels
    # What the UNet is conditioned on: text (the bundle's text encoder), class (a learned token per class label) or
    # none (unconditional; one learned token); ldm.models.labels. A class label is the caption, or with
    # labels_from "folder" the name of the image's folder.
    conditioning: Conditioning = Conditioning.TEXT
    labels_from: LabelSource = LabelSource.CAPTION
    train: TrainConfig = UNET_TRAIN
    loss: LossConfig = field(default_factory=LossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)  # prior preservation (ldm.train.dreambooth)
    train_text_encoder: bool = False  # also train the text encoder (LoRA on it too when lora.rank > 0)
    text_encoder_lr: float = 0.0  # 0 = train.lr
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30 % slower
    adam_8bit: bool = False  # bitsandbytes' 8-bit AdamW (CUDA only; falls back to torch AdamW with a note)
    eval_data: str = ""  # held-out folder: loss per timestep range at every validation; "": the data's test/ split
    name: str = ""  # the written bundle's name (PNG metadata says "Model: NAME"); "" = the base bundle's

    def __post_init__(self):
        if self.upscale_factor < 2:
            raise ValueError(f"upscale_factor must be at least 2 (the output side / the input side), got "
                             f"{self.upscale_factor}; try 2")  # fmt: skip


def bundle_config(path: str) -> ModelConfig:
    """The model config of the bundle at ``path``, with a message that says what to pass when there is none."""
    if not Path(path).is_dir():
        raise LdmError(f"no model bundle at {path}; pass --bundle the bundle folder train_vae.py wrote (OUT/bundle)")
    return load_bundle(path, verify=False).config


def task_model(model: ModelConfig, *, task: Task, upscale_factor: int, what: str) -> ModelConfig:
    """The config of the model that training ``what`` (a bundle whose config is ``model``) for ``task`` makes:
    ``model`` itself when it is of that task already (a fine-tune continued), else its text-to-image config made over
    for the task (a noise-level embedding of one level per training timestep for an upscaler)."""
    if model.task is task:
        if task is Task.UPSCALE and model.upscale_factor != upscale_factor:
            raise LdmError(f"{what} is an x{model.upscale_factor} upscaler; pass --factor {model.upscale_factor} "
                           "to train it further, or start another factor from a text_to_image bundle")  # fmt: skip
        return model
    if model.task is not Task.TEXT_TO_IMAGE:
        needs = "trains text_to_image bundles only" if task is Task.TEXT_TO_IMAGE else (
            f"starts from a text_to_image bundle (or a {task.value} one, to train it further)")  # fmt: skip
        raise LdmError(f"{what} is an {model.task.value} model, and --task {task.value} {needs}; pass --task "
                       f"{model.task.value} to train it further, or another --bundle")  # fmt: skip
    return model.for_task(task, upscale_factor=upscale_factor, noise_levels=model.schedule.num_train_timesteps)


def with_model(cfg: UNetRunConfig) -> UNetRunConfig:
    """``cfg`` with its model filled in from its bundle when the run config leaves it out, made over for its task."""
    model = cfg.model if cfg.model is not None else bundle_config(cfg.bundle)
    model = task_model(model, task=cfg.task, upscale_factor=cfg.upscale_factor, what=f"the bundle {cfg.bundle}")
    return cfg if model == cfg.model else replace(cfg, model=model)


def check_model(cfg: UNetRunConfig, base: Bundle) -> None:
    """The run config's model must be the bundle's made over for the task, but for the schedule (which LoRA must
    keep as well); the task's settings must fit the model and the data."""
    expected = task_model(base.config, task=cfg.task, upscale_factor=cfg.upscale_factor,
                          what=f"the bundle {cfg.bundle}")  # fmt: skip
    for part in ("vae", "text_encoder", "unet", "task", "upscale_factor"):
        if getattr(cfg.model, part) != getattr(expected, part):
            raise LdmError(
                f"model.{part} differs from the bundle {cfg.bundle}'s; only model.schedule may be changed (the UNet is "
                "trained for it), the parts' shapes come from the bundle and the task"
            )
    if cfg.lora.rank and cfg.model.schedule != base.config.schedule:
        raise LdmError(
            "LoRA adapters keep the base model's schedule and prediction type; train without --lora-rank to change them"
        )
    if cfg.conditioning is not Conditioning.TEXT and (cfg.lora.rank or cfg.train_text_encoder):
        raise LdmError(f"--conditioning {cfg.conditioning.value} trains the UNet and its label tokens; leave out "
                       "--lora-rank and --train-text-encoder")  # fmt: skip
    if cfg.conditioning is Conditioning.TEXT and base.labels is not None:
        raise LdmError(f"the bundle {cfg.bundle} is {base.config.conditioning.value}-conditioned; pass --conditioning "
                       f"{base.config.conditioning.value} to go on training it")  # fmt: skip
    if cfg.lora.rank and base.config.task is not cfg.task:
        raise LdmError(f"--task {cfg.task.value} from a {base.config.task.value} bundle trains the UNet's new input "
                       "channels, which LoRA adapters leave out; train without --lora-rank")  # fmt: skip
    factor, unet = base.config.vae.downsampling_factor, base.config.unet
    if cfg.buckets.step % factor:
        raise LdmError(f"buckets.step must be a multiple of the VAE's downsampling factor {factor}, got "
                       f"{cfg.buckets.step}; try {max(factor, cfg.buckets.step // factor * factor)}")  # fmt: skip
    check_task(cfg)
    check_training_size(side=cfg.data.resolution, factor=factor, batch=cfg.train.batch_size,
                        channels=unet.block_out_channels, layers=unet.layers_per_block, what="UNet training",
                        input_scale=factor)  # fmt: skip


def check_task(cfg: UNetRunConfig) -> None:
    """An upscaler's data side and bucket step must be multiples of the factor × the VAE's factor (the low-res image
    encodes to whole latents), and its noise levels must be ones the UNet embeds."""
    if cfg.task is not Task.UPSCALE:
        return
    f, vae_factor, levels = cfg.upscale_factor, cfg.model.vae.downsampling_factor, cfg.model.unet.num_class_embeds
    cell, side = f * vae_factor, cfg.data.resolution
    if side % cell:
        fix = max(cell, side // cell * cell)
        raise LdmError(f"an x{f} upscaler trains at a data.resolution that is a multiple of {cell} ({f} × the VAE's "
                       f"{vae_factor} pixels per latent), got {side}; try --resolution {fix}")  # fmt: skip
    if cfg.buckets.step % cell:
        raise LdmError(f"an x{f} upscaler needs buckets.step a multiple of {cell} ({f} × the VAE's {vae_factor}), got "
                       f"{cfg.buckets.step}; try {max(cell, cfg.buckets.step // cell * cell)}")  # fmt: skip
    top = min(levels, cfg.model.schedule.num_train_timesteps)
    if cfg.task_inputs.max_noise_level > top:
        raise LdmError(f"task_inputs.max_noise_level must be at most {top} (the UNet's noise levels), got "
                       f"{cfg.task_inputs.max_noise_level}; try {min(350, top)}")  # fmt: skip
    if cfg.validation.noise_level >= top:
        raise LdmError(f"validation.noise_level must be below {top} (the UNet's noise levels), got "
                       f"{cfg.validation.noise_level}; try {min(20, top - 1)}")  # fmt: skip


# --- what a run builds and leaves -----------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """(x_t and the task's channels, t, text, class labels) → the UNet's prediction, with the text encoder inside
    when it is trained, so that accelerate/DDP see every trained parameter in one forward. Checkpoints keep the
    trained parameters only."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, labels: LabelEncoder | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.labels = labels  # a class-conditional or unconditional run's label tokens, trained with the UNet

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None, label_ids: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        if input_ids is not None:  # (B, L) token ids → (B, L, D) hidden states, with gradients
            context = self.text_encoder(input_ids).hidden_states
        if label_ids is not None:  # (B,) class labels → (B, 1, D) learned tokens, with gradients
            context = self.labels(label_ids).hidden_states
        extra = {"timestep_cond": timestep_cond} if timestep_cond is not None else {}  # a distilled student's ω
        return self.unet(x_in, t, encoder_hidden_states=context, class_labels=class_labels, **extra).sample  # (B, C, h, w)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            raise LdmError(
                "the checkpoint's trained parameters do not fit this run (LoRA rank or --train-text-encoder changed?)"
            )
        self.load_state_dict(state, strict=False)


@dataclass
class TrainData:
    """The training items and the order they are batched in; ``cache`` holds their features (None: encoded live)."""

    report: ScanReport
    items: UNetItems
    order: EpochBatches | BucketBatches | PriorBatches
    cache: FeatureCache | None
    instances: int | None = None  # DreamBooth's prior preservation: the items from this index on are class images


@dataclass
class HeldOut:
    latents: torch.Tensor  # (N, C, h, w) scaled posterior means
    captions: list[str]
    buckets: list[tuple[int, int]]  # [lo, hi) timestep ranges
    timesteps: torch.Tensor  # (K, N) one fixed t per bucket and image
    noise: torch.Tensor  # (K, N, C, h, w)
    features: FeatureCache | None = None  # the held-out captions' hidden states when the cache is on
    condition: Condition = field(default_factory=Condition)  # the task's input per image: fixed masks / noise levels


@dataclass
class Trainables:
    """What is trained: the UNet (all of it, or its LoRA adapters) and the text encoder when asked, wrapped in the
    accelerate-prepared :class:`Denoiser`, with its optimizer, LR schedule and EMA."""

    unet: nn.Module
    text_encoder: nn.Module
    denoiser: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None
    labels: LabelEncoder | None = None  # a class-conditional or unconditional run's label tokens

    def state(self) -> TrainingState:
        """What a checkpoint restores of them."""
        return TrainingState(
            models={"unet": self.denoiser}, optimizers={"unet": self.optimizer},
            schedulers={"unet": self.lr_scheduler}, emas={"unet": self.ema} if self.ema else {}, progress=Progress(),
        )  # fmt: skip


@dataclass
class RunResult:
    """What a run leaves behind; the modules are the trained ones (EMA weights copied in)."""

    progress: Progress
    unet: nn.Module
    text_encoder: nn.Module
    bundle_dir: Path | None = None
    lora_path: Path | None = None
    embedding_path: Path | None = None  # textual inversion: OUT/TOKEN.safetensors
    eval_losses: dict[str, float] = field(default_factory=dict)
    steps_per_second: float = 0.0


# --- the run --------------------------------------------------------------------------------------------------------


def run(cfg: UNetRunConfig, *, resume: str | None = None) -> RunResult:
    """Train as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from the start), and
    write ``OUT/bundle`` (or ``OUT/lora.safetensors``) and ``OUT/eval.json``."""
    cfg = with_model(cfg)
    check_dreambooth(cfg.dreambooth, data=cfg.data, task=cfg.task, conditioning=cfg.conditioning,
                     bucketing=cfg.buckets.enabled)  # fmt: skip
    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume=resume))


def _run(cfg: UNetRunConfig, accelerator: Accelerator, *, resume: str | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    out = Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, out)
    torch.manual_seed(cfg.train.seed)

    base = load_base(cfg, accelerator)
    data = training_data(cfg, base, accelerator)
    held = held_out_set(cfg, base, accelerator)
    labels = label_tokens(cfg, base, data.report)
    model = build_trainables(cfg, base, accelerator, labels=labels)
    state = model.state()
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="train_unet")

    conditioning = (LabelConditioning(labels, accelerator=accelerator) if labels is not None else
                    TextConditioning(base, trains_text=cfg.train_text_encoder, accelerator=accelerator))  # fmt: skip
    config = replace(base.config, schedule=cfg.model.schedule, conditioning=cfg.conditioning,
                     classes=labels.classes if labels is not None else ())  # fmt: skip
    result_bundle = replace(base, config=config, labels=labels)
    validate = validation(cfg, result_bundle, model, conditioning, held, prompts=validation_prompts(cfg, data.report),
                          report=data.report, accelerator=accelerator)  # fmt: skip
    result = train_timed(
        accelerator, state, unet=model.unet, text_encoder=model.text_encoder, cfg=cfg.train, dataset=data.items,
        config=cfg, sample_fn=validate, ema_models=[(model.ema, model.unet)] if model.ema else [],
        batch_order=data.order, step_fn=step_function(cfg, base, model, conditioning, data.cache,
                                                      instances=data.instances, accelerator=accelerator),
    )  # fmt: skip
    if not accelerator.is_main_process:
        return result
    finish(cfg, result_bundle, model, validate, result, accelerator=accelerator)
    return result


def load_base(cfg: UNetRunConfig, accelerator: Accelerator) -> Bundle:
    """The bundle whose UNet is trained, checked against the run config and made over for the task (its config the
    run's model with the bundle's schedule, its UNet widened); its VAE frozen on the device, its text encoder on the
    device too."""
    base = load_bundle(cfg.bundle)
    check_model(cfg, base)
    if base.config.task is not cfg.task:
        base = replace(base, config=replace(cfg.model, schedule=base.config.schedule),
                       unet=widen_for_task(base.unet, cfg.model.unet))  # fmt: skip
        if accelerator.is_main_process:
            added = cfg.model.unet.in_channels - cfg.model.vae.latent_channels
            embedding = " and its noise-level embedding" if cfg.task is Task.UPSCALE else ""
            print(f"note: the {cfg.task.value} UNet starts as the bundle's text-to-image one: its {added} new input "
                  f"channels{embedding} start at zero")  # fmt: skip
    if accelerator.is_main_process:
        if base.config.vae.scaling_factor == 1.0:
            print("note: the VAE's scaling factor is 1.0 (not measured); train_vae.py measures it, and latents far "
                  "from unit variance train poorly")  # fmt: skip
        was, now = base.config.schedule, cfg.model.schedule
        if now != was:
            print(f"note: training for {now.prediction.value} / {now.beta_schedule.value}; the bundle was "
                  f"{was.prediction.value} / {was.beta_schedule.value}")  # fmt: skip
    base.vae.float().eval().requires_grad_(False).to(accelerator.device)
    base.text_encoder.float().to(accelerator.device)
    return base


def training_data(cfg: UNetRunConfig, base: Bundle, accelerator: Accelerator) -> TrainData:
    """The data report, the batch order (checked before anything is encoded: too little data for one batch fails
    here), the feature cache and the items."""
    main_process = accelerator.is_main_process
    report = relabel(cfg, report_dataset(cfg.data, quiet=not main_process, share=scan_share(accelerator)))
    report, instances = with_class_images(cfg.dreambooth, cfg.data, report, base, accelerator=accelerator)
    targets, buckets = training_targets(cfg, report, base)
    if instances is not None:
        order = PriorBatches(instances, len(targets) - instances, cfg.train.batch_size, seed=cfg.train.seed,
                             num_replicas=accelerator.num_processes, rank=accelerator.process_index)  # fmt: skip
    elif buckets is not None:
        order = BucketBatches([buckets.index(t) for t in targets], cfg.train.batch_size, seed=cfg.train.seed,
                              num_replicas=accelerator.num_processes, rank=accelerator.process_index)  # fmt: skip
    else:
        order = EpochBatches(len(targets), cfg.train.batch_size, seed=cfg.train.seed,
                             num_replicas=accelerator.num_processes, rank=accelerator.process_index)  # fmt: skip
    cache = feature_cache(cfg, base, report, targets, buckets, accelerator=accelerator)
    items = UNetItems(
        report, targets=targets, center_crop=cfg.data.center_crop, flip_p=cfg.data.random_flip,
        caption_dropout=cfg.loss.caption_dropout, seed=cfg.train.seed, cache=cache,
        pixels=cfg.task is not Task.TEXT_TO_IMAGE,  # the masked or low-res image is encoded every step
    )  # fmt: skip
    return TrainData(report=report, items=items, order=order, cache=cache, instances=instances)


def training_targets(cfg: UNetRunConfig, report: ScanReport, base: Bundle) -> tuple[list[tuple[int, int]], list | None]:
    """(width, height) per usable pair, and the buckets (None without bucketing); prints the bucket table."""
    r = cfg.data.resolution
    if not cfg.buckets.enabled:
        return [(r, r)] * len(report.pairs), None
    vae_factor = base.config.vae.downsampling_factor
    step = cfg.buckets.step or math.lcm(
        bucket_step(vae_factor=vae_factor, unet_levels=len(base.config.unet.block_out_channels)),
        vae_factor * cfg.model.upscale_factor,  # an upscaler's low-res image encodes to whole latents
    )
    buckets = make_buckets(r, step=step, max_aspect=cfg.buckets.max_aspect)
    sizes = [report.sizes[pair.image] for pair in report.pairs]
    assignment = assign_buckets(sizes, buckets, min_count=cfg.train.batch_size)
    counts = {b: assignment.count(i) for i, b in enumerate(buckets) if i in assignment}
    print(
        f"buckets ({step} px steps, about {r}×{r} px each): "
        + ", ".join(f"{w}×{h} {n}" for (w, h), n in counts.items())
    )
    return [buckets[i] for i in assignment], buckets


def cache_dir(cfg: UNetRunConfig) -> Path:
    return Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.train.output_dir) / "cache"


def feature_cache(cfg: UNetRunConfig, base: Bundle, report: ScanReport, targets, buckets, *,
                  accelerator: Accelerator) -> FeatureCache | None:  # fmt: skip
    """VAE posteriors (centre crops only) and caption hidden states in float32; None when the cache is off. All
    processes build it together (each its share), then all read it."""
    if not cfg.cache.enabled:
        return None
    main_process = accelerator.is_main_process
    cache_latents = cfg.data.center_crop
    if not cache_latents and main_process:
        print("note: random crops (data.center_crop=false) cannot be cached; the VAE encodes every step")
    return load_or_build_cache(
        cache_path(cache_dir(cfg), cfg.data, "train"), bundle=base, data=cfg.data, report=report, targets=targets,
        buckets=buckets, latents=cache_latents, batch_size=cfg.cache.batch_size, device=accelerator.device,
        accelerator=accelerator,
    )  # fmt: skip


def held_out_set(cfg: UNetRunConfig, base: Bundle, accelerator: Accelerator) -> HeldOut | None:
    """The held-out set, on the main process: fixed latents (posterior means), and per timestep range one t and one
    noise per image, drawn once from a private generator (the training RNG is untouched). None without eval_data or
    a test split of the data (see :func:`~ldm.data.held_out`)."""
    if not accelerator.is_main_process:
        return None
    data = held_out(cfg.data, cfg.eval_data)
    if data is None:
        return None
    report = report_dataset(data, progress=False)
    report = replace(report, pairs=report.distinct_pairs[: cfg.validation.eval_images])
    n, r = len(report.pairs), cfg.data.resolution
    features = load_or_build_cache(
        cache_path(cache_dir(cfg), data, "eval") if cfg.cache.enabled else None, bundle=base, data=data,
        report=report, targets=[(r, r)] * n, buckets=None, latents=True, batch_size=cfg.cache.batch_size,
        device=accelerator.device,
    )  # fmt: skip
    latents = torch.stack([features.latent(i)[0] for i in range(n)]) * base.config.vae.scaling_factor  # (N, C, h, w)
    generator = torch.Generator().manual_seed(cfg.validation.seed)
    ranges = timestep_bucket_edges(cfg.model.schedule.num_train_timesteps, cfg.validation.timestep_buckets)
    timesteps = torch.stack([torch.randint(lo, hi, (n,), generator=generator) for lo, hi in ranges])  # (K, N)
    noise = torch.randn((len(ranges), *latents.shape), generator=generator)  # (K, N, C, h, w)
    condition = Condition()
    if cfg.task is not Task.TEXT_TO_IMAGE:  # one mask or noise level and noise per image, drawn after the above
        condition_of, parts = task_conditioner(cfg, base, accelerator=accelerator), []
        for start in range(0, n, cfg.cache.batch_size):
            pixels = torch.stack([fit_tensor(read_scanned_image(pair), (r, r))
                                  for pair in report.pairs[start : start + cfg.cache.batch_size]])  # fmt: skip
            parts.append(condition_of(pixels.to(accelerator.device), generator=generator).to(torch.device("cpu")))
        condition = Condition.cat(parts)
    return HeldOut(latents=latents, captions=[pair.caption for pair in report.pairs], buckets=ranges,
                   timesteps=timesteps, noise=noise, features=features if cfg.cache.enabled else None,
                   condition=condition)  # fmt: skip


def build_trainables(cfg: UNetRunConfig, base: Bundle, accelerator: Accelerator, *,
                     labels: LabelEncoder | None = None) -> Trainables:  # fmt: skip
    """The trained parameters in their optimizer groups (the text encoder's at ``text_encoder_lr``; the label tokens
    with the UNet's), the accelerate-prepared denoiser, optimizer and LR schedule, and the UNet's EMA."""
    unet = base.unet.float().to(accelerator.device)
    unet_params, text_params = trained_parameters(cfg, unet, base.text_encoder)
    if labels is not None:
        labels.float().to(accelerator.device).requires_grad_(True).train()
        unet_params = unet_params + list(labels.parameters())
    groups = [{"params": unet_params}]
    if cfg.task is not Task.TEXT_TO_IMAGE and not cfg.lora.rank:  # the task's new inputs learn faster
        inputs = {id(p) for module in (unet.conv_in, unet.class_embedding) if module is not None
                  for p in module.parameters()}  # fmt: skip
        groups = [{"params": [p for p in unet_params if id(p) not in inputs]},
                  {"params": [p for p in unet_params if id(p) in inputs],
                   "lr": cfg.train.lr * cfg.task_inputs.input_lr_scale}]  # fmt: skip
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr or cfg.train.lr})
    denoiser = Denoiser(unet, base.text_encoder if cfg.train_text_encoder else None, labels)
    optimizer = make_unet_optimizer(groups, cfg, cuda=accelerator.device.type == "cuda")
    lr_scheduler = make_lr_scheduler(optimizer, cfg.train, processes=accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    return Trainables(unet=unet, text_encoder=base.text_encoder, denoiser=denoiser, params=unet_params + text_params,
                      optimizer=optimizer, lr_scheduler=lr_scheduler, ema=make_ema(unet, cfg.train),
                      labels=labels)  # fmt: skip


def relabel(cfg: UNetRunConfig, report: ScanReport) -> ScanReport:
    """With ``labels_from: folder`` each pair's caption becomes its folder's name: the class it is trained on."""
    if cfg.conditioning is not Conditioning.CLASS or cfg.labels_from is LabelSource.CAPTION:
        return report
    return replace(report, pairs=[replace(pair, caption=Path(str(pair.image)).parent.name) for pair in report.pairs])


def label_tokens(cfg: UNetRunConfig, base: Bundle, report: ScanReport) -> LabelEncoder | None:
    """The label tokens a class-conditional or unconditional run trains: the base's when it has the same classes
    (a run that continues one), else new ones; the classes are the data's distinct labels, sorted. None for text."""
    if cfg.conditioning is Conditioning.TEXT:
        return None
    classes = ()
    if cfg.conditioning is Conditioning.CLASS:
        classes = tuple(sorted({pair.caption for pair in report.pairs if pair.caption}))
        if not classes:
            raise LdmError(f"--conditioning class found no labels in {cfg.data.path} (every caption is empty); give "
                           "the images captions, or --labels-from folder for class folders")  # fmt: skip
    if base.labels is not None and base.config.classes == classes:
        return base.labels
    return build_label_encoder(classes, base.config.unet.cross_attention_dim)


class LabelConditioning:
    """Captions (class names; '' the null label, as caption dropout leaves it) → the denoiser's label ids. A
    held-out caption that is no class of the training data is the null label."""

    def __init__(self, labels: LabelEncoder, *, accelerator: Accelerator):
        self.labels, self.accelerator = labels, accelerator
        self.index = {name: i for i, name in enumerate(labels.classes)}

    def __call__(self, captions: list[str], features: FeatureCache | None = None) -> dict:
        ids = [self.index.get(c, self.labels.null) for c in captions]
        return {"label_ids": torch.tensor(ids, dtype=torch.long, device=self.accelerator.device)}


def trained_parameters(cfg: UNetRunConfig, unet: nn.Module, text_encoder: nn.Module) -> tuple[list, list]:
    """The UNet's and the text encoder's trained parameters (LoRA adapters when ``lora.rank`` > 0; the text
    encoder's only with ``train_text_encoder``); the modules put in train or eval mode to match."""
    text_model = text_encoder.model
    if cfg.lora.rank:
        from ldm.train.lora import TEXT_TARGETS, UNET_TARGETS, add_lora

        unet_params = add_lora(unet, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=UNET_TARGETS)
        text_params = (
            add_lora(text_model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=TEXT_TARGETS)
            if cfg.train_text_encoder
            else []
        )
    else:
        unet_params = list(unet.requires_grad_(True).parameters())
        text_params = list(text_model.requires_grad_(True).parameters()) if cfg.train_text_encoder else []
    unet.train()
    if cfg.train_text_encoder:
        text_encoder.train()
    else:
        text_encoder.requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:  # transformers 5 renamed it
            getattr(text_model, "activation_checkpointing_enable", text_model.gradient_checkpointing_enable)()
    return unet_params, text_params


def make_unet_optimizer(groups: list[dict], cfg: UNetRunConfig, *, cuda: bool) -> torch.optim.Optimizer:
    """AdamW: bitsandbytes' 8-bit one when asked for, installed and on CUDA; else torch's, with a note why."""
    if cfg.adam_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("note: adam_8bit asked for but bitsandbytes is not installed; using torch AdamW")
        else:
            if cuda:
                t = cfg.train
                return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
            print("note: 8-bit AdamW needs a CUDA GPU; using torch AdamW")
    return make_optimizer(groups, cfg.train)


# --- the step -------------------------------------------------------------------------------------------------------


class TextConditioning:
    """Captions → the denoiser's text input: token ids when the text encoder is trained (its gradients flow through
    the denoiser), else hidden states, from a feature cache or from the frozen encoder."""

    def __init__(self, bundle: Bundle, *, trains_text: bool, accelerator: Accelerator):
        self.bundle, self.trains_text, self.accelerator = bundle, trains_text, accelerator

    def token_ids(self, captions: list[str]) -> torch.Tensor:  # (B, L)
        te = self.bundle.config.text_encoder
        ids = tokenize(self.bundle.tokenizer, captions, context_length=te.context_length, pad_id=te.pad_id)
        return ids.to(self.accelerator.device)

    def __call__(self, captions: list[str], features: FeatureCache | None) -> dict:
        if self.trains_text:
            return {"input_ids": self.token_ids(captions)}
        if features is not None:
            return {"context": features.text(captions).to(self.accelerator.device)}  # (B, L, D)
        with torch.no_grad(), self.accelerator.autocast():
            return {"context": self.bundle.text_encoder(self.token_ids(captions)).hidden_states}


def latents_of(batch: dict, vae: nn.Module, *, scaling: float, accelerator: Accelerator,
               shard: BatchShard = BatchShard()) -> torch.Tensor:  # fmt: skip
    """Scaled posterior samples z = (μ + σ·n)·scaling_factor, from the cache's (mean, logvar) or the VAE's encoding
    of the pixels; n from the global RNG, which checkpoints restore, drawn for the global batch (``shard``)."""
    device = accelerator.device
    if "mean" in batch:
        mean, logvar = batch["mean"].to(device), batch["logvar"].to(device)  # (B, C, h, w)
    else:
        with torch.no_grad(), accelerator.autocast():
            posterior = vae.encode(batch["pixel_values"].to(device)).latent_dist
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
    n = shard.local(torch.randn(shard.global_shape(mean.shape))).to(device)
    return (mean + torch.exp(0.5 * logvar) * n) * scaling  # (B, C, h, w)


def task_conditioner(cfg: UNetRunConfig, base: Bundle, *, accelerator: Accelerator) -> Callable[..., Condition]:
    """``condition_of(pixels, generator=None, shard=...)``: the task's input (``ldm.train.tasks.make_condition``) of a batch of
    signed pixels on the device, the masked or low-res images encoded by the frozen VAE (scaled posterior means)."""
    scaling, ac = base.config.vae.scaling_factor, alphas_cumprod(cfg.model.schedule)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return base.vae.encode(pixels).latent_dist.mean.float() * scaling  # (B, C, H/f, W/f)

    def condition_of(pixels: torch.Tensor, *, generator: torch.Generator | None = None,
                     shard: BatchShard = BatchShard()) -> Condition:  # fmt: skip
        return make_condition(cfg.task, pixels, encode=encode, config=cfg.task_inputs, upscale_factor=cfg.upscale_factor,
                              alphas_cumprod=ac, generator=generator, shard=shard)  # fmt: skip

    return condition_of


def noised_latents(cfg: UNetRunConfig, base: Bundle, *, accelerator: Accelerator) -> Callable[[dict], tuple]:
    """``noised(batch)`` → (x₀, t, x_t, target): the batch's scaled posterior samples, timesteps drawn uniformly,
    x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε with (offset) noise ε, and the UNet's training target (ε or v). Every draw is made for
    the whole global batch from the global RNG, and this process keeps its rows (:class:`BatchShard`), so N processes
    draw what one does. Shared by every run that trains on the denoising loss (UNet, DreamBooth, textual inversion)."""
    schedule, device, shard = cfg.model.schedule, accelerator.device, batch_shard(accelerator)
    ac, scaling = alphas_cumprod(schedule), base.config.vae.scaling_factor  # (T,)

    def noised(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x0 = latents_of(batch, base.vae, scaling=scaling, accelerator=accelerator, shard=shard)  # (B, C, h, w)
        noise = shard.local(offset_noise(shard.global_shape(x0.shape), strength=cfg.loss.noise_offset)).to(device)
        t = shard.local(sample_timesteps(shard.global_count(len(x0)), schedule.num_train_timesteps)).to(device)
        return x0, t, add_noise(x0, noise, t, ac), training_target(x0, noise, t, ac, schedule.prediction)

    return noised


def train_timed(accelerator: Accelerator, state: TrainingState, *, unet: nn.Module, text_encoder: nn.Module,
                **loop: object) -> RunResult:  # fmt: skip
    """:func:`~ldm.train.loop.train_loop` with ``loop``'s arguments, then, once every process is done, the result
    with its speed (printed on the main process)."""
    started, first_step = time.monotonic(), state.progress.step
    train_loop(accelerator=accelerator, state=state, **loop)
    elapsed = time.monotonic() - started
    steps = state.progress.step - first_step
    accelerator.wait_for_everyone()
    result = RunResult(progress=state.progress, unet=unet, text_encoder=text_encoder,
                       steps_per_second=steps / elapsed if elapsed > 0 else 0.0)  # fmt: skip
    if accelerator.is_main_process:
        print(f"{steps} steps in {elapsed:.1f} s ({result.steps_per_second:.2f} steps/s)")
    return result


def step_function(cfg: UNetRunConfig, base: Bundle, model: Trainables, conditioning: TextConditioning,
                  cache: FeatureCache | None, *, instances: int | None = None,
                  accelerator: Accelerator) -> StepFn:  # fmt: skip
    """One micro-batch: noise the latents at random timesteps, add the task's input (masks, noise levels: drawn
    after the noise and timesteps, from the same global RNG), predict, Min-SNR-weighted MSE (with ``instances``,
    DreamBooth's prior-preservation loss over the instance and class items), update. Every draw is made for the whole
    global batch, and this process keeps its rows of it (:class:`BatchShard`)."""
    schedule, device, shard = cfg.model.schedule, accelerator.device, batch_shard(accelerator)
    ac = alphas_cumprod(schedule)  # (T,)
    noised = noised_latents(cfg, base, accelerator=accelerator)
    condition_of = task_conditioner(cfg, base, accelerator=accelerator)
    text_only = cfg.task is Task.TEXT_TO_IMAGE

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        with accelerator.accumulate(model.denoiser):
            x0, t, x_t, target = noised(batch)
            condition = Condition() if text_only else condition_of(batch["pixel_values"].to(device), shard=shard)
            prediction = model.denoiser(unet_input(x_t, condition), t, class_labels=condition.class_labels,
                                        **conditioning(batch["caption"], cache))  # fmt: skip
            weights = min_snr_weights(t, ac, gamma=cfg.loss.min_snr_gamma, prediction=schedule.prediction)
            loss, terms = batch_loss(prediction, target, weights, batch["index"], instances=instances,
                                     prior_weight=cfg.dreambooth.prior_loss_weight)  # fmt: skip
            backward_step(accelerator, loss, model.optimizer, model.lr_scheduler, params=model.params,
                          grad_clip=cfg.train.grad_clip)  # fmt: skip
        return {"loss": float(loss.detach())} | terms

    return step_fn


# --- validation -----------------------------------------------------------------------------------------------------


def validation_prompts(cfg: UNetRunConfig, report: ScanReport) -> list[str]:
    """The grids' prompts: the configured ones, else the first distinct captions of the data, or for inpaint and
    upscale the captions of the images the grid starts from (:func:`task_examples`)."""
    if cfg.validation.prompts:
        return list(cfg.validation.prompts)
    if cfg.conditioning is Conditioning.NONE:
        return [""] * cfg.validation.num_prompts
    if cfg.task is not Task.TEXT_TO_IMAGE:
        return [pair.caption for pair in report.pairs[: cfg.validation.num_prompts]]
    distinct = list(dict.fromkeys(pair.caption for pair in report.pairs if pair.caption))
    return distinct[: cfg.validation.num_prompts] or [""]


@contextlib.contextmanager
def ema_weights(ema, module: nn.Module):
    """Run the body with the EMA weights in ``module``; the training weights come back bit-exactly."""
    if ema is None:
        yield
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield
    finally:
        ema.restore(module.parameters())


@dataclass
class TaskExamples:
    """What an inpaint or upscale grid starts from, and what its first row shows of it."""

    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    shown: torch.Tensor  # (N, 3, H, W) in [0, 1]: the masked images, or the low-res ones enlarged (nearest)
    mask: torch.Tensor | None = None  # inpaint: (N, 1, H, W), 1 = repaint
    low_res: torch.Tensor | None = None  # upscale: (N, 3, H/f, W/f) in [0, 1]


def task_examples(cfg: UNetRunConfig, report: ScanReport, count: int) -> TaskExamples:
    """The first ``count`` training images (centre crops, repeated when there are fewer), with masks drawn once
    from the validation seed (rectangles or strokes, never the whole image: the grid shows what is kept) or their
    low-res versions."""
    r, f = cfg.data.resolution, cfg.upscale_factor
    pairs = [report.pairs[i % len(report.pairs)] for i in range(count)]
    pixels = torch.stack([fit_tensor(read_scanned_image(pair), (r, r)) for pair in pairs])  # (N, 3, r, r)
    if cfg.task is Task.INPAINT:
        shapes = replace(cfg.task_inputs, rectangle_masks=0.5, stroke_masks=0.5, full_masks=0.0)
        mask = random_masks(count, height=r, width=r, config=shapes,
                            generator=torch.Generator().manual_seed(cfg.validation.seed))  # fmt: skip
        return TaskExamples(images=signed_to_unit(pixels), shown=signed_to_unit(masked_image(pixels, mask)), mask=mask)
    low_res = signed_to_unit(downsample(pixels, f))  # (N, 3, r/f, r/f)
    return TaskExamples(images=signed_to_unit(pixels), low_res=low_res,
                        shown=torch.nn.functional.interpolate(low_res, scale_factor=f, mode="nearest"))  # fmt: skip


def task_request(task: Task, settings: dict, examples: TaskExamples, *, noise_level: int) -> Request:
    """The :class:`~ldm.pipeline.Request` of an inpaint or upscale grid: ``settings`` (prompts, seeds, steps, sampler,
    size) and the task's inputs, inpaint ``image``, ``strength`` 1 and ``mask``, upscale ``low_res`` and
    ``noise_level``."""
    inputs = {
        Task.INPAINT: {"image": examples.images, "strength": 1.0, "mask": examples.mask},
        Task.UPSCALE: {"low_res": examples.low_res, "noise_level": noise_level},
    }[task]  # fmt: skip
    return Request(**settings, **inputs)


def validation(cfg: UNetRunConfig, bundle: Bundle, model: Trainables, conditioning: TextConditioning,
               held: HeldOut | None, *, prompts: list[str], report: ScanReport,
               accelerator: Accelerator) -> Callable[[int], dict[str, float]]:  # fmt: skip
    """``validate(step)``: on the main process, the sample grid of ``prompts`` (``samples/``, TensorBoard; for inpaint
    and upscale a row of inputs from ``report``'s images above the results) and the held-out losses (logged and
    returned), with the EMA weights; the training weights, modes and RNG are left as they were. ``bundle`` is the
    one being trained, with the schedule it is trained for."""
    out, v, r = Path(cfg.train.output_dir), cfg.validation, cfg.data.resolution
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    settings = dict(
        prompts=prompts, negative_prompts=[""] * len(prompts), seeds=[v.seed + i for i in range(len(prompts))],
        steps=v.steps, guidance_scale=v.guidance_scale, sampler=get_sampler(v.sampler), width=r, height=r,
    )  # fmt: skip
    examples, request = None, None
    if cfg.task is Task.TEXT_TO_IMAGE:
        request = Request(**settings)
    elif accelerator.is_main_process:
        examples = task_examples(cfg, report, len(prompts))
        request = task_request(cfg.task, settings, examples, noise_level=v.noise_level)

    @torch.no_grad()
    def validate(step: int) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        losses = {}
        with torch.random.fork_rng(devices=devices), ema_weights(model.ema, model.unet):
            model.unet.eval()
            model.text_encoder.eval()
            if request is not None:
                images = generate(bundle, request, progress=False)  # (N, 3, H, W) in [0, 1]
                rows = images if examples is None else torch.cat([examples.shown, images])  # inputs above results
                log_grid(accelerator, "samples", image_grid(rows, columns=len(images)), step, out)
            if held is not None:
                losses = held_out_losses(held, denoiser=accelerator.unwrap_model(model.denoiser),
                                         conditioning=lambda captions: conditioning(captions, held.features),
                                         schedule=cfg.model.schedule, batch_size=cfg.train.batch_size,
                                         accelerator=accelerator)  # fmt: skip
                accelerator.log(losses, step=step)
            model.unet.train()
            if cfg.train_text_encoder:
                model.text_encoder.train()
        return losses

    return validate


@torch.no_grad()
def held_out_losses(held: HeldOut, *, denoiser, conditioning, schedule, batch_size, accelerator) -> dict[str, float]:
    """Unweighted MSE of the prediction target per timestep range (``eval/loss_t000-199``) and their mean."""
    device = accelerator.device
    ac, prediction = alphas_cumprod(schedule), schedule.prediction  # (T,)
    losses = {}
    for k, (lo, hi) in enumerate(held.buckets):
        total = 0.0
        for start in range(0, len(held.latents), batch_size):
            end = min(start + batch_size, len(held.latents))
            x0 = held.latents[start:end].to(device)
            noise, t = held.noise[k, start:end].to(device), held.timesteps[k, start:end].to(device)
            condition = held.condition.rows(start, end).to(device)
            with accelerator.autocast():
                x_in = unet_input(add_noise(x0, noise, t, ac), condition)
                pred = denoiser(x_in, t, class_labels=condition.class_labels, **conditioning(held.captions[start:end]))
            total += weighted_mse(pred, training_target(x0, noise, t, ac, prediction)).item() * (end - start)
        width = len(str(held.buckets[-1][1] - 1))
        losses[f"eval/loss_t{lo:0{width}d}-{hi - 1:0{width}d}"] = total / len(held.latents)
    losses["eval/loss"] = sum(losses.values()) / len(held.buckets)
    return losses


# --- the end --------------------------------------------------------------------------------------------------------


def finish(cfg: UNetRunConfig, bundle: Bundle, model: Trainables, validate, result: RunResult, *,
           accelerator: Accelerator) -> None:  # fmt: skip
    """The EMA weights into the modules, the final validation (once) and ``OUT/eval.json``, then the result:
    ``OUT/bundle``, or for LoRA ``OUT/lora.safetensors`` (and a merged bundle when asked)."""
    out = Path(cfg.train.output_dir)
    if model.ema is not None:
        model.ema.copy_to(model.unet.parameters())  # the result gets the EMA weights
    result.eval_losses = validate(result.progress.step)
    if result.eval_losses:
        (out / "eval.json").write_text(json.dumps(result.eval_losses, indent=2) + "\n")
        print(
            "held-out loss: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in result.eval_losses.items())
        )
    model.unet.eval()
    model.text_encoder.eval()
    if cfg.lora.rank:
        write_lora(cfg, model, result)
    else:
        written = replace(bundle, vae=bundle.vae.cpu(), text_encoder=model.text_encoder.cpu(), unet=model.unet.cpu(),
                          labels=model.labels.cpu().eval() if model.labels is not None else None,
                          name=cfg.name or bundle.name)  # fmt: skip
        result.bundle_dir = save_bundle(written, out / "bundle")
        task = "" if cfg.task is Task.TEXT_TO_IMAGE else f"{cfg.task.value} "
        print(f"bundle written to {result.bundle_dir} ({task}UNet trained for {cfg.model.schedule.prediction.value})")


def write_lora(cfg: UNetRunConfig, model: Trainables, result: RunResult) -> None:
    """``OUT/lora.safetensors`` and ``OUT/lora.kohya.safetensors`` (the same adapters in the two formats), and with
    ``lora.merge_bundle`` ``OUT/bundle``: the base with the adapters merged."""
    from ldm.train.lora import KOHYA_NAME, apply_lora, save_kohya_lora, save_lora

    out = Path(cfg.train.output_dir)
    text_model = model.text_encoder.model.cpu() if cfg.train_text_encoder else None
    result.lora_path = save_lora(out / "lora.safetensors", unet=model.unet.cpu(), text_encoder=text_model)
    kohya = save_kohya_lora(out / KOHYA_NAME, unet=model.unet, text_encoder=text_model)  # for A1111, ComfyUI
    print(f"LoRA written to {result.lora_path} (diffusers format) and {kohya} (kohya format, for A1111 and ComfyUI); "
          f"use either with: generate.py --model {cfg.bundle} --lora FILE")  # fmt: skip
    if cfg.lora.merge_bundle:
        merged = apply_lora(load_bundle(cfg.bundle), result.lora_path, scale=1.0)
        result.bundle_dir = save_bundle(replace(merged, name=cfg.name or merged.name), out / "bundle")
        print(f"bundle with the LoRA merged written to {result.bundle_dir}")
