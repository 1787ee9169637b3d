"""Train the UNet of a bundle on its frozen VAE's latents, conditioned on its frozen text encoder, into a new bundle.

    python train_unet.py --bundle runs/vae-emoji/bundle --data data/emoji/train --eval-data data/emoji/test \\
        --out runs/unet-emoji --max-steps 20000 --set train.mixed_precision=bf16
    python train_unet.py --config configs/runs/emoji-tiny-unet.yaml --bundle runs/clip/bundle --out runs/unet
    python train_unet.py --out runs/unet-emoji --resume latest              # continue exactly where it stopped
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/ft            # full fine-tune
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/lora --lora-rank 8
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/inpaint --task inpaint
    python train_unet.py --init-from models/emoji-tiny --data my/images --out runs/x2 --task upscale --factor 2
    python train_unet.py --init-from models/emoji-tiny --data classes/ --out runs/cls --conditioning class --labels-from folder
    python train_unet.py --init-from models/emoji-tiny --data my/cat --out runs/ti --textual-inversion my-cat --init-word cat
    python train_unet.py --init-from models/emoji-tiny --instance-data my/dog --instance-prompt "a photo of sks dog" \
        --class-data my/dogs --class-prompt "a photo of a dog" --out runs/sks-dog                       # DreamBooth

The run itself (loss, cache, LoRA, validation, what is written) is ``ldm.train.unet``, or with
``--textual-inversion`` ``ldm.train.textual_inversion``; this module turns argv into their
:class:`~ldm.train.unet.UNetRunConfig`: a ``--config`` file or the flags, then the flags that override, then ``--set``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ldm.cli.common import ArgumentParser, run_cli
from ldm.cli.options import (
    add_run_arguments,
    load_run_config,
    train_main,
    with_data_flags,
    with_run_flags,
)
from ldm.config import apply_overrides
from ldm.data import DataConfig, Layout
from ldm.errors import LdmError
from ldm.models.labels import Conditioning
from ldm.models.presets import Task
from ldm.pipeline.schedule import Prediction
from ldm.train import textual_inversion
from ldm.train.dreambooth import train_settings as dreambooth_train
from ldm.train.unet import LabelSource, UNetRunConfig, bundle_config, run, with_model


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train_unet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle whose UNet to train (from train_vae.py / train_clip.py)")
    p.add_argument("--init-from", help="the same as --bundle: fine-tune this bundle's UNet")
    add_run_arguments(p, eval_help="held-out image folder: loss per timestep range at each validation",
                      out_help="output folder: checkpoints/, samples/, logs/, cache/, bundle/")  # fmt: skip
    p.add_argument(
        "--prediction", choices=[p.value for p in Prediction], help="train for ε or v (default: the bundle's)"
    )
    p.add_argument("--task", choices=[t.value for t in Task],
                   help="what the UNet learns (default text_to_image): inpaint also reads a masked image and its "
                   "mask, upscale a low-res image; both start from a text_to_image bundle (or one of the task)")  # fmt: skip
    p.add_argument("--factor", type=int, help="--task upscale: output side / input side (default 2); the data trains "
                   "at the bundle's size × this unless --resolution")  # fmt: skip
    p.add_argument("--conditioning", choices=[c.value for c in Conditioning],
                   help="what the UNet is conditioned on (default text): class trains one learned token per class "
                        "label (the captions, or --labels-from folder), none an unconditional model")  # fmt: skip
    p.add_argument("--labels-from", choices=[s.value for s in LabelSource],
                   help="--conditioning class: each image's class is its caption (default) or its folder's name")
    p.add_argument("--no-cache", action="store_true", default=None, help="encode images and captions every step")
    p.add_argument("--cache-dir", help="feature cache folder, shareable between runs (default OUT/cache)")
    p.add_argument("--bucketing", action="store_true", default=None, help="aspect-ratio buckets for mixed-size data")
    p.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters only; written to OUT/lora.safetensors")
    p.add_argument("--train-text-encoder", action="store_true", default=None, help="also train the text encoder")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower steps")
    p.add_argument("--textual-inversion", metavar="TOKEN",
                   help="train only the vectors of a new word TOKEN, the model frozen (textual inversion); writes "
                        "OUT/TOKEN.safetensors (A1111's layout) and OUT/learned_embeds.safetensors (diffusers')")  # fmt: skip
    p.add_argument("--init-word", help="--textual-inversion: the vectors start as this word's (default *)")
    p.add_argument("--num-vectors", type=int, help="--textual-inversion: vectors the word stands for (default 1)")
    add_dreambooth_arguments(p)
    p.add_argument(
        "--validation-prompt",
        action="append",
        dest="validation_prompts",
        metavar="PROMPT",
        help="prompt of the sample grids (repeatable; default: captions from the data)",
    )
    return p


def add_dreambooth_arguments(p: ArgumentParser) -> None:
    group = p.add_argument_group("DreamBooth (a subject from a few pictures; Ruiz et al. 2023)")
    group.add_argument("--instance-data", metavar="DIR", help="the subject's pictures (no captions needed), in place "
                       "of --data: every one is trained with --instance-prompt")  # fmt: skip
    group.add_argument("--instance-prompt", metavar="PROMPT", help="the subject's prompt, with a rare token: "
                       "'a photo of sks dog'")  # fmt: skip
    group.add_argument("--class-data", metavar="DIR", help="prior preservation: pictures of the subject's class; the "
                       "missing ones are generated there by the model before training")  # fmt: skip
    group.add_argument("--class-prompt", metavar="PROMPT", help="the class's prompt, without the token: 'a photo of "
                       "a dog'")  # fmt: skip
    group.add_argument("--num-class-images", type=int, metavar="N", help="class images trained on (default 100)")
    group.add_argument("--prior-loss-weight", type=float, metavar="W",
                       help="loss = instance loss + W × class loss (default 1.0)")  # fmt: skip


def resolve_config(args) -> UNetRunConfig:
    """Config file, else flags; a resumed run reads the config its checkpoints were written with. The flags given
    and then ``--set`` override it."""
    if args.bundle and args.init_from and args.bundle != args.init_from:
        raise LdmError("--bundle and --init-from name the same thing; pass one of them")
    bundle = args.bundle or args.init_from
    check_dreambooth_flags(args)
    cfg = load_run_config(UNetRunConfig, args)
    if cfg is None:
        cfg = with_inversion_flags(config_from_flags(args, bundle), args, fresh=True)
    elif args.config:
        cfg = with_inversion_flags(cfg, args)
        cfg = with_data_flags(cfg, args)
        cfg = replace(cfg, bundle=bundle) if bundle else cfg
    cfg = with_dreambooth_flags(cfg, args)
    if cfg.textual_inversion.token and cfg.dreambooth.class_data:
        raise LdmError("textual inversion trains a word's vectors, DreamBooth's prior preservation the UNet; run them "
                       "separately (drop --class-data or --textual-inversion)")  # fmt: skip
    cfg = with_run_flags(with_model(with_task_flags(cfg, args)), args)
    if args.eval_data is not None:
        cfg = replace(cfg, eval_data=args.eval_data)
    return apply_overrides(with_unet_flags(cfg, args), args.overrides)


def config_from_flags(args, bundle: str | None) -> UNetRunConfig:
    """The run config of a new run given by flags alone: the bundle's model made over for --task, at its size
    (an upscaler's: the bundle's × --factor) unless --resolution."""
    if not args.data and not args.instance_data:
        raise LdmError("no training data; pass --data FOLDER (see `python -m ldm data check FOLDER`)")
    if not bundle:
        raise LdmError("pass --bundle BUNDLE: the bundle (from train_vae.py or train_clip.py) whose UNet to train")
    cfg = UNetRunConfig(model=bundle_config(bundle), data=DataConfig(path=args.data or args.instance_data,
                        center_crop=True), bundle=str(bundle))  # fmt: skip
    if args.instance_data:
        cfg = replace(cfg, train=dreambooth_train(cfg.train, lora=bool(args.lora_rank)),
                      loss=replace(cfg.loss, caption_dropout=0.0))  # the instance prompt is the point  # fmt: skip
    cfg = with_model(with_task_flags(cfg, args))
    return replace(cfg, data=replace(cfg.data, resolution=args.resolution or cfg.model.default_size))


def with_inversion_flags(cfg: UNetRunConfig, args, *, fresh: bool = False) -> UNetRunConfig:
    """--textual-inversion, --init-word and --num-vectors; a new run from flags alone takes the training defaults of
    textual inversion (:data:`~ldm.train.textual_inversion.INVERSION_TRAIN`, no caption dropout)."""
    given = {name: getattr(args, flag) for flag, name in (("textual_inversion", "token"), ("init_word", "init_word"),
             ("num_vectors", "num_vectors")) if getattr(args, flag) is not None}  # fmt: skip
    if not given:
        return cfg
    try:
        ti = replace(cfg.textual_inversion, **given)
    except ValueError as exc:
        raise LdmError(str(exc).replace("textual_inversion.token", "--textual-inversion")) from None
    if not ti.token:
        raise LdmError("--init-word and --num-vectors are textual inversion's; pass --textual-inversion TOKEN")
    cfg = replace(cfg, textual_inversion=ti)
    if fresh:
        cfg = replace(cfg, train=textual_inversion.INVERSION_TRAIN, loss=replace(cfg.loss, caption_dropout=0.0))
    return cfg
def check_dreambooth_flags(args) -> None:
    """The DreamBooth flags' values, the subject's pair, and its folder must hold pictures (the class flags are
    checked against the run config: :func:`with_dreambooth_flags`)."""
    from ldm.data.layouts import walk_images

    if args.instance_data and args.data:
        raise LdmError("--instance-data is the training data of a DreamBooth run; pass it or --data, not both")
    if bool(args.instance_data) != bool(args.instance_prompt):
        raise LdmError("--instance-prompt captions the pictures of --instance-data; pass both" if args.instance_prompt
                       else "--instance-data needs --instance-prompt, the subject's prompt with a rare token, e.g. "
                       "--instance-prompt 'a photo of sks dog'")  # fmt: skip
    weight = args.prior_loss_weight
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise LdmError(f"--prior-loss-weight must be a number ≥ 0 (0: the class images train nothing), got "
                       f"{args.prior_loss_weight}; try --prior-loss-weight 1.0")  # fmt: skip
    if args.num_class_images is not None and args.num_class_images < 1:
        raise LdmError(f"--num-class-images must be at least 1, got {args.num_class_images}; try 100")
    if args.instance_data:
        folder = Path(args.instance_data)
        if not folder.is_dir():
            raise LdmError(f"--instance-data {folder} not found; pass the folder that holds the subject's pictures")
        if next(walk_images(folder), None) is None:
            raise LdmError(f"--instance-data {folder} holds no pictures (.png, .jpg, .webp, ...); put 3–5 photos of "
                           "the subject there")  # fmt: skip


def with_dreambooth_flags(cfg: UNetRunConfig, args) -> UNetRunConfig:
    """--instance-data and --instance-prompt: the data, every picture captioned the prompt; the class flags: the
    ``dreambooth`` section."""
    db = cfg.dreambooth
    class_data, class_prompt = args.class_data or db.class_data, args.class_prompt or db.class_prompt
    if class_data and not class_prompt:
        raise LdmError("--class-data needs --class-prompt, the class without the rare token, e.g. --class-prompt "
                       "'a photo of a dog'")  # fmt: skip
    if class_prompt and not class_data:
        raise LdmError("--class-prompt needs --class-data DIR, the folder of class images (the missing ones are "
                       "generated there); pass both, or neither to train without prior preservation")  # fmt: skip
    if (args.num_class_images is not None or args.prior_loss_weight is not None) and not class_data:
        raise LdmError("--num-class-images and --prior-loss-weight set up prior preservation; pass --class-data and "
                       "--class-prompt with them")  # fmt: skip
    if args.instance_data:
        cfg = replace(cfg, data=replace(cfg.data, path=args.instance_data, split=None, layout=Layout.IMAGES,
                                        metadata=None, caption=args.instance_prompt))  # fmt: skip
    settings = {key: value for key, value in (("class_data", args.class_data), ("class_prompt", args.class_prompt),
                ("num_class_images", args.num_class_images), ("prior_loss_weight", args.prior_loss_weight))
                if value is not None}  # fmt: skip
    try:
        return replace(cfg, dreambooth=replace(db, **settings)) if settings else cfg
    except ValueError as exc:  # a value the config refuses
        raise LdmError(str(exc)) from None


def with_task_flags(cfg: UNetRunConfig, args) -> UNetRunConfig:
    """--task and --factor (the upscaler's only, at least 2); :func:`~ldm.train.unet.with_model` then makes the
    model over for them."""
    if args.task:
        cfg = replace(cfg, task=Task(args.task))
    if args.factor is not None:
        if args.factor < 2:
            raise LdmError(f"--factor must be at least 2 (the output side / the input side), got {args.factor}; "
                           "try --factor 2")  # fmt: skip
        if cfg.task is not Task.UPSCALE:
            raise LdmError(f"--factor is the upscaler's, and this run's task is {cfg.task.value}; pass --task upscale")
        cfg = replace(cfg, upscale_factor=args.factor)
    if args.conditioning:
        cfg = replace(cfg, conditioning=Conditioning(args.conditioning))
    if args.labels_from:
        if cfg.conditioning is not Conditioning.CLASS:
            raise LdmError("--labels-from says where the classes come from; pass --conditioning class with it")
        cfg = replace(cfg, labels_from=LabelSource(args.labels_from))
    return cfg


def with_unet_flags(cfg: UNetRunConfig, args) -> UNetRunConfig:
    """The flags of this script that set run config fields: --prediction, the cache, buckets, LoRA, the text
    encoder, gradient checkpointing and the validation prompts."""
    if args.prediction:
        schedule = replace(cfg.model.schedule, prediction=Prediction(args.prediction))
        cfg = replace(cfg, model=replace(cfg.model, schedule=schedule))
    if args.no_cache:
        cfg = replace(cfg, cache=replace(cfg.cache, enabled=False))
    if args.cache_dir:
        cfg = replace(cfg, cache=replace(cfg.cache, dir=args.cache_dir))
    if args.bucketing:
        cfg = replace(cfg, buckets=replace(cfg.buckets, enabled=True))
    if args.lora_rank is not None:
        if args.lora_rank < 0:
            raise LdmError(f"--lora-rank must be ≥ 0 (0 = full fine-tune), got {args.lora_rank}; try --lora-rank 8")
        cfg = replace(cfg, lora=replace(cfg.lora, rank=args.lora_rank))
    if args.train_text_encoder:
        cfg = replace(cfg, train_text_encoder=True)
    if args.gradient_checkpointing:
        cfg = replace(cfg, gradient_checkpointing=True)
    if args.validation_prompts:
        cfg = replace(cfg, validation=replace(cfg.validation, prompts=tuple(args.validation_prompts)))
    return cfg


def run_any(cfg: UNetRunConfig, *, resume: str | None = None):
    """The UNet run, or the textual-inversion run where the config names a token."""
    return (textual_inversion.run if cfg.textual_inversion.token else run)(cfg, resume=resume)


def main(argv=None) -> int:
    return train_main(argv, parser=build_parser(), resolve=resolve_config, run=run_any)


def entry() -> None:
    """The installed command and the root script: run with argv, exit with the status."""
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    entry()
