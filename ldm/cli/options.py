"""Flags that several commands share, and how they become typed configs: the dataset layout and the run flags."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ldm.accel.checks import Backend
from ldm.cli.common import check_output
from ldm.config import apply_overrides, load_yaml
from ldm.data.config import LAYOUT_FLAGS, Layout
from ldm.errors import LdmError


def add_backend_argument(parser, *, default: str | None, help_text: str) -> None:
    """``--backend``, the same choices in every command that runs the UNet (generate.py, eval, serve)."""
    parser.add_argument("--backend", default=default, choices=[b.value for b in Backend], help=help_text)


def add_layout_arguments(parser) -> None:
    """The flags that say how a dataset folder is laid out (default: detected)."""
    group = parser.add_argument_group("dataset layout (default: detected from the folder)")
    group.add_argument("--split", help="split subfolder to read, e.g. test (default train/ in a folder of splits; "
                       "held-out sets default to test/ or validation/)")  # fmt: skip
    group.add_argument("--layout", choices=[layout.value for layout in Layout], help="default: detect")
    group.add_argument("--metadata", help="caption table inside the folder (default metadata.jsonl / metadata.csv)")
    group.add_argument("--image-column", help="default file_name (imagefolder) / image (csv), else the other")
    group.add_argument("--caption-column", help="default text (imagefolder) / caption (csv), else the other; the "
                       "caption key of webdataset .json files (default caption, else text)")  # fmt: skip
    group.add_argument("--caption-extension", help="kohya caption files, webdataset text members (default .txt)")


def layout_settings(args) -> dict:
    """The DataConfig fields the layout flags in ``args`` set (the ones given)."""
    settings = {}
    for flag, name in LAYOUT_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            settings[name] = Layout(value) if name == "layout" else value
    return settings


def add_run_arguments(parser, *, eval_help: str, out_help: str) -> None:
    """The flags every training script takes; the script adds its own."""
    parser.add_argument("--config", type=Path, help="run config YAML (configs/runs/, or OUT/config.yaml of an earlier "
                        "run); the other flags and --set override it")  # fmt: skip
    parser.add_argument("--data", help="training image folder (any layout ldm.data reads)")
    parser.add_argument("--eval-data", help=eval_help)
    parser.add_argument("--resolution", type=int, help="training side in pixels (default: the model's)")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-minutes", type=float, help="stop this invocation after so much wall time")
    parser.add_argument("--budget-minutes", type=float,
                        help="training time of the whole run (over resumes); a decaying LR anneals within it")  # fmt: skip
    parser.add_argument("--name", help="name of the bundle written (PNG metadata: 'Model: NAME'; default: the "
                        "name of the bundle or preset the run starts from)")  # fmt: skip
    parser.add_argument("--resume", help="'latest' or a checkpoint file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="typed config override, e.g. --set train.lr=1e-4 (repeatable)")  # fmt: skip
    add_layout_arguments(parser)  # for --data and --eval-data alike


def load_run_config(cls, args):
    """The run config from ``--config FILE``, or when resuming, the ``OUT/config.yaml`` the run started with;
    None when the script should build it from its flags."""
    if args.config:
        return load_yaml(cls, args.config)
    saved = Path(args.out) / "config.yaml" if args.out else None
    if args.resume and saved is not None and saved.is_file():
        return load_yaml(cls, saved)
    return None


def with_data_flags(cfg, args):
    """``cfg`` (read from ``--config FILE``) with the folders and size the flags give: ``--data`` (data.path),
    ``--eval-data`` (eval_data) and ``--resolution`` (data.resolution)."""
    data = {key: getattr(args, flag) for flag, key in (("data", "path"), ("resolution", "resolution"))
            if getattr(args, flag, None) is not None}  # fmt: skip
    try:
        cfg = replace(cfg, data=replace(cfg.data, **data))
    except ValueError as exc:  # e.g. --resolution 0
        raise LdmError(str(exc)) from None
    return cfg if args.eval_data is None else replace(cfg, eval_data=args.eval_data)


def with_run_flags(cfg, args):
    """``cfg`` with ``--out``, ``--max-steps``, ``--max-minutes`` and ``--budget-minutes`` applied to its ``train``
    section (they may change on resume: a run is extended or moved without touching the rest of its config),
    ``--name`` to its ``name``, and the dataset layout flags (``--layout``, ``--metadata``, ...) to its ``data``
    section."""
    train = {key: getattr(args, flag) for flag, key in (("out", "output_dir"), ("max_steps", "max_steps"),
             ("max_minutes", "max_minutes"), ("budget_minutes", "budget_minutes"))
             if getattr(args, flag, None) is not None}  # fmt: skip
    layout = layout_settings(args)
    data_before = cfg.data  # on resume: the data the run was started with
    try:
        cfg = replace(cfg, train=replace(cfg.train, **train), data=replace(cfg.data, **layout))
    except ValueError as exc:  # a flag's value the config refuses, e.g. --budget-minutes -1
        raise LdmError(str(exc)) from None
    if getattr(args, "name", None) is not None:
        cfg = replace(cfg, name=args.name)
    started = (Path(cfg.train.output_dir) / "config.yaml").is_file()  # written once a run has read its data
    if args.resume and started and cfg.data != data_before:
        raise LdmError(
            "the dataset layout flags would change the data of a run being resumed (its batches are positions "
            "in that listing); drop them, or start a new run with --out"
        )
    return cfg


def check_run_outputs(cfg) -> None:
    """A run's output folder (and a feature cache folder, where the run has one) can be written: checked before
    the data is scanned or a model loaded."""
    check_output(Path(cfg.train.output_dir), folder=True, flag="--out")
    cache = getattr(getattr(cfg, "cache", None), "dir", None)
    if cache:
        check_output(Path(cache), folder=True, flag="--cache-dir")


def resolve_run_config(cls, args, *, from_flags, with_source, with_model, check):
    """A training run's config: ``--config FILE`` (the flags that name the data and the starting point apply on top),
    else the resumed run's own ``OUT/config.yaml``, else ``from_flags(args)``; then the run flags and ``--set``
    override it, and ``check`` refuses what the types cannot."""
    cfg = load_run_config(cls, args)
    if cfg is None:
        cfg = from_flags(args)
    elif args.config:
        cfg = with_source(with_data_flags(cfg, args), args)
    cfg = apply_overrides(with_run_flags(with_model(cfg), args), args.overrides)
    check(cfg)
    return cfg


def train_main(argv, *, parser, resolve, run) -> int:
    """A training command: argv to the run config, the outputs checked, then the library's ``run``."""
    args = parser.parse_args(argv)
    cfg = resolve(args)
    check_run_outputs(cfg)
    run(cfg, resume=args.resume)
    return 0
