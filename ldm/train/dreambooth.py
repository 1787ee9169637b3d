"""DreamBooth (Ruiz et al. 2023): teach a model one subject from a few pictures, named by a rare token.

The subject's pictures are the run's ``data`` in the ``images`` layout, every one captioned with the instance prompt
(``data.caption``, e.g. "a photo of sks dog"); with nothing more that is a plain fine-tune of ``ldm.train.unet``.
Prior preservation (the ``dreambooth`` section, :class:`DreamBoothConfig`) adds the class: pictures of the subject's
class captioned with the class prompt ("a photo of a dog"), which the base model draws itself before training when
``class_data`` holds fewer than ``num_class_images`` of them (:func:`generate_class_images`). Training on them keeps
what the model knew of the class while the subject is learned (the paper's language drift and loss of diversity).

The class images join the instance images in one listing (the instance items first, then the class items), so the
feature cache, the items and the validation prompts of UNet training serve both. Every batch holds B instance items
and B class items (:class:`PriorBatches`, a pure function of the seed and the position, so resuming is exact), and the
loss is :func:`~ldm.train.objectives.prior_preservation_loss`: the instance term plus ``prior_loss_weight`` times the
class term, each with the run's Min-SNR weights and prediction target.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ldm.data import DataConfig, Layout, ScanReport, report_dataset, scan_dataset
from ldm.errors import LdmError
from ldm.formats.bundle import Bundle
from ldm.formats.pngmeta import ImageParameters, save_png
from ldm.images import uint8_to_pil
from ldm.models.labels import Conditioning
from ldm.models.presets import Task
from ldm.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, Request, generate, to_uint8
from ldm.pipeline.schedule import get_sampler
from ldm.train.distributed import scan_share
from ldm.train.loop import EpochBatches, LRSchedule, TrainConfig
from ldm.train.objectives import prior_preservation_loss, weighted_mse


@dataclass(frozen=True, kw_only=True)
class DreamBoothConfig:
    """Prior preservation: the class images, how many, how much their loss counts, and how the missing ones are
    drawn (generate.py's defaults)."""

    class_data: str = ""  # folder of class images; "" = no prior preservation
    class_prompt: str = ""  # their caption: the class without the rare token, e.g. "a photo of a dog"
    num_class_images: int = 100  # the first this many images of class_data train; missing ones are generated first
    prior_loss_weight: float = 1.0  # λ: loss = instance loss + λ · class loss
    seed: int = 0  # class image number i is generated with seed + i
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    sampler: str = DEFAULT_SAMPLER
    negative_prompt: str = ""
    batch_size: int = 4  # images per generate call

    def __post_init__(self):
        if bool(self.class_data) != bool(self.class_prompt):
            given, missing = ("class_data", "class_prompt") if self.class_data else ("class_prompt", "class_data")
            raise ValueError(f"dreambooth.{given} needs dreambooth.{missing} too (prior preservation trains the class "
                             "images with the class prompt); set both, or neither")  # fmt: skip
        if not (math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0):
            raise ValueError(f"dreambooth.prior_loss_weight must be a finite number ≥ 0 (0: the class images train "
                             f"nothing), got {self.prior_loss_weight}; try 1.0")  # fmt: skip
        for name, fix in (("num_class_images", 100), ("steps", 20), ("batch_size", 4)):
            if getattr(self, name) < 1:
                raise ValueError(f"dreambooth.{name} must be at least 1, got {getattr(self, name)}; try {fix}")
        if self.guidance_scale < 0:
            raise ValueError(f"dreambooth.guidance_scale must be at least 0, got {self.guidance_scale}; try 7.5")
        try:
            get_sampler(self.sampler)
        except LdmError as exc:
            raise ValueError(f"dreambooth.sampler: {exc}") from None

    @property
    def prior(self) -> bool:
        """Whether the run preserves the class prior."""
        return bool(self.class_data)


# A run started by the DreamBooth flags (the UNet's defaults are a long pretraining's; the loss's caption dropout
# is turned off as well: the prompt is the point).
def train_settings(train: TrainConfig, *, lora: bool) -> TrainConfig:
    """DreamBooth's training settings: a few hundred steps at a constant learning rate with no warm-up (5e-6 for a
    full fine-tune, 1e-4 for LoRA), one subject picture a batch (and one class picture), no EMA, a checkpoint and a
    grid every 100 steps."""
    return replace(train, batch_size=1, lr=1e-4 if lora else 5e-6, lr_schedule=LRSchedule.CONSTANT, warmup_steps=0,
                   max_steps=400, ema_decay=0.0, checkpoint_every=100, sample_every=100)  # fmt: skip


def check_dreambooth(db: DreamBoothConfig, *, data: DataConfig, task: Task, conditioning: Conditioning,
                     bucketing: bool) -> None:  # fmt: skip
    """What prior preservation cannot train with: another task or conditioning, buckets, a class folder inside the
    subject's ``data`` folder (or the other way round: the images layout reads every image below its folder)."""
    if not db.prior:
        return
    if task is not Task.TEXT_TO_IMAGE:
        raise LdmError(f"prior preservation trains text_to_image models (the base draws the class images); leave out "
                       f"--task {task.value}, or --class-data")  # fmt: skip
    if conditioning is not Conditioning.TEXT:
        raise LdmError("prior preservation trains a text-conditioned model (the prompts name subject and class); "
                       f"leave out --conditioning {conditioning.value}")  # fmt: skip
    if bucketing:
        raise LdmError("prior preservation batches instance and class images at one size; leave out --bucketing")
    ours, theirs = Path(data.path).resolve(), Path(db.class_data).resolve()
    if ours == theirs or ours in theirs.parents or theirs in ours.parents:
        raise LdmError(f"the class images ({db.class_data}) and the subject's ({data.path}) share a folder, and every "
                       "image below a folder is read; put each set in a folder of its own")  # fmt: skip


def class_data(db: DreamBoothConfig, data: DataConfig) -> DataConfig:
    """The class folder read as the subject's ``data`` is (size, crop, flip), every image captioned the class
    prompt."""
    return replace(data, path=db.class_data, split=None, layout=Layout.IMAGES, metadata=None, caption=db.class_prompt)


# --- the class images -----------------------------------------------------------------------------------------------

NUMBERED = re.compile(r"(\d+)")


def next_number(folder: Path) -> int:
    """One more than the highest number any file name in ``folder`` starts with (0 in a folder of none)."""
    taken = [int(m[1]) for p in folder.iterdir() if (m := NUMBERED.match(p.name))] if folder.is_dir() else []
    return max(taken, default=-1) + 1


def generate_class_images(bundle: Bundle, folder: Path, *, count: int, prompt: str, size: int,
                          config: DreamBoothConfig, progress: bool = True) -> list[Path]:  # fmt: skip
    """``count`` new images of ``prompt`` drawn by ``bundle`` at ``size``² into ``folder``, as ``NNNNN-SEED.png`` with
    their generation parameters in the PNG (as generate.py writes them): numbered after every file there, so nothing
    is overwritten; image number i uses seed ``config.seed`` + i. The global RNG is left as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    first, sampler = next_number(folder), get_sampler(config.sampler)
    devices = [bundle.unet.device] if bundle.unet.device.type == "cuda" else []
    written = []
    bar = tqdm(total=count, desc="generating class images", unit="img", disable=not progress)
    with torch.random.fork_rng(devices=devices):
        for start in range(0, count, config.batch_size):
            numbers = list(range(first + start, first + min(count, start + config.batch_size)))
            seeds = [config.seed + k for k in numbers]
            request = Request(prompts=[prompt] * len(numbers), negative_prompts=[config.negative_prompt] * len(numbers),
                              seeds=seeds, steps=config.steps, guidance_scale=config.guidance_scale, sampler=sampler,
                              width=size, height=size)  # fmt: skip
            images = to_uint8(generate(bundle, request, progress=False))  # (B, 3, size, size) uint8
            for pos, (k, seed, pixels) in enumerate(zip(numbers, seeds, images)):
                record = ImageParameters(
                    prompt=prompt, negative_prompt=config.negative_prompt, steps=config.steps, sampler=sampler.label,
                    guidance_scale=config.guidance_scale, seed=seed, width=size, height=size,
                    model_hash=bundle.model_hash, model=bundle.name, batch_size=len(numbers), batch_pos=pos,
                )  # fmt: skip
                written.append(save_png(uint8_to_pil(pixels), folder / f"{k:05d}-{seed}.png", record.text()))
                bar.update(1)
    bar.close()
    return written


def fill_class_folder(db: DreamBoothConfig, data: DataConfig, base: Bundle) -> int:
    """Generate the class images ``db.class_data`` lacks (its usable images are kept and counted) at ``data``'s
    resolution; returns how many were made. ``base``: the bundle before any training, its UNet on the device."""
    folder = Path(db.class_data)
    have = len(scan_dataset(class_data(db, data), progress=False).pairs) if folder.is_dir() else 0
    missing = max(0, db.num_class_images - have)
    if missing:
        print(f"class images: {folder} holds {have} of {db.num_class_images}; generating {missing} of "
              f"'{db.class_prompt}' with the base model")  # fmt: skip
        base.unet.eval()
        generate_class_images(base, folder, count=missing, prompt=db.class_prompt, size=data.resolution, config=db)
    return missing


def with_class_images(db: DreamBoothConfig, data: DataConfig, report: ScanReport, base: Bundle, *,
                      accelerator: Accelerator) -> tuple[ScanReport, int | None]:  # fmt: skip
    """``report`` (of the subject's ``data``) with the class pairs after its own (the first ``num_class_images`` of
    the class folder, made first where missing: by the main process, the others wait), and the number of subject
    pairs; without prior preservation ``report`` and None. ``base``: the bundle trained, ``accelerator`` the run's."""
    if not db.prior:
        return report, None
    if accelerator.is_main_process:
        base.unet.float().to(accelerator.device)
        fill_class_folder(db, data, base)
    accelerator.wait_for_everyone()
    classes = report_dataset(class_data(db, data), file=sys.stdout if accelerator.is_main_process else None,
                             share=scan_share(accelerator))
    pairs = classes.pairs[: db.num_class_images]
    if accelerator.is_main_process:
        print(f"DreamBooth: {len(report.pairs)} instance images ('{data.caption}'), {len(pairs)} class images "
              f"('{db.class_prompt}'), prior loss weight {db.prior_loss_weight:g}")  # fmt: skip
    merged = replace(report, pairs=(*report.pairs, *pairs), sizes={**report.sizes, **classes.sizes})
    return merged, len(report.pairs)


# --- batches and loss -----------------------------------------------------------------------------------------------


class PriorBatches:
    """Index batches of B/W instance items and then B/W class items (B the global batch, W the processes); the interface of :class:`~ldm.train.loop.EpochBatches`.

    The instance items ``0 … I−1`` are batched as :class:`EpochBatches` does (an epoch is one pass over them). The
    class items ``I … I+C−1`` fill the class places from a stream of permutations of them: the place that is the
    s-th of the whole run (global batch k, process r, place j: s = k·B + r·B/W + j, B the global batch) takes item ``perm_q[s mod C]``
    of permutation q = s div C, each seeded by (seed, q). Every class image is seen once before any is seen twice,
    and a batch is a pure function of the seed and its position, so a resumed run draws the same batches.
    """

    def __init__(self, instances: int, classes: int, batch_size: int, *, seed: int, num_replicas: int = 1,
                 rank: int = 0):  # fmt: skip
        if classes < 1:
            raise LdmError("the class folder holds no usable images; check the class data report above")
        self.instance_order = EpochBatches(instances, batch_size, seed=seed, num_replicas=num_replicas, rank=rank)
        self.instances, self.classes, self.batch_size, self.seed = instances, classes, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self._permutations: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.instance_order)

    def permutation(self, q: int) -> list[int]:
        if q not in self._permutations:
            digest = hashlib.blake2b(f"class:{self.seed}:{q}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            self._permutations = {q: torch.randperm(self.classes, generator=generator).tolist()}  # one at a time
        return self._permutations[q]

    def class_item(self, place: int) -> int:
        q, r = divmod(place, self.classes)
        return self.instances + self.permutation(q)[r]

    def epoch(self, epoch: int, *, start: int = 0) -> list[list[int]]:
        per_process = self.instance_order.per_process  # B is the global batch: each process its B / W of both kinds
        out = []
        for b, batch in enumerate(self.instance_order.epoch(epoch, start=start), start=start):
            first = (epoch * len(self) + b) * self.batch_size + self.rank * per_process
            out.append(batch + [self.class_item(first + j) for j in range(per_process)])
        return out


def batch_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, index, *,
               instances: int | None, prior_weight: float) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """The step's loss and what to log beside it: :func:`~ldm.train.objectives.weighted_mse`, or with ``instances``
    (items from that index on are class images; ``index``: the batch's item indices) the prior-preservation loss and
    its two terms."""
    if instances is None:
        return weighted_mse(prediction, target, weights), {}
    prior = torch.as_tensor(index) >= instances  # (B,)
    loss, instance, class_prior = prior_preservation_loss(prediction, target, weights, prior=prior,
                                                          prior_weight=prior_weight)  # fmt: skip
    return loss, {"loss/instance": float(instance.detach()), "loss/prior": float(class_prior.detach())}
