"""Serve the A1111-compatible HTTP API and the web page.

    python -m ldm serve                                   # http://127.0.0.1:7860, models from models/
    python -m ldm serve --models-dir models --model emoji-tiny --lora-dir loras --api-auth user:secret --listen
    python -m ldm serve --embeddings-dir embeddings       # prompts may name its NAME.safetensors files
"""

from __future__ import annotations

from pathlib import Path

from ldm.accel.checks import Backend, check
from ldm.cli.common import DEFAULT_MODEL, ArgumentParser, exit_now, run_cli
from ldm.cli.options import add_backend_argument
from ldm.errors import LdmError
from ldm.runtime import DTYPES, resolve_device


def build_parser() -> ArgumentParser:
    from ldm.serve.a1111 import Limits

    d = Limits()
    p = ArgumentParser(prog="ldm serve", description="An A1111-compatible HTTP API and web page for ldm models.")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODEL.parent,
                   help=f"the models clients may choose: bundles and .safetensors checkpoints in this folder "
                        f"(default {DEFAULT_MODEL.parent})")  # fmt: skip
    p.add_argument("--model", default=None, metavar="NAME", help="the model served first (default: the first one)")
    p.add_argument("--lora-dir", type=Path, default=None, help="the LoRA files (.safetensors) prompts may name")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="the textual-inversion embeddings (.safetensors) prompts may name by file name (default "
                        "models/embeddings/ where it exists)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("outputs"), help="where images are saved (default outputs/)")
    p.add_argument("--no-save", action="store_true", help="do not save images; only return them")
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 instead of 127.0.0.1 (reachable from others)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS", help="require HTTP basic auth on every route")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    add_backend_argument(p, default="torch",
                   help_text="what runs the UNet, as generate.py --backend (default torch; openvino: pip install "
                        "'ldm[openvino]', fp32 on the CPU)")  # fmt: skip
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights and activations (default fp32)")
    p.add_argument("--max-side", type=int, default=d.max_side, help=f"most pixels of width/height (default {d.max_side})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"most sampling steps (default {d.max_steps})")
    p.add_argument("--max-images", type=int, default=d.max_images,
                   help=f"most batch_size × n_iter per request (default {d.max_images})")  # fmt: skip
    p.add_argument("--max-body", type=int, default=d.max_body, help=f"most bytes of a request (default {d.max_body})")
    p.add_argument("--preview-every", type=int, default=None,
                   help="sampling steps between the previews /progress shows, each decoded only once a /progress call "
                        "asks for it; 0: none (default: every step where the model has a tiny autoencoder, which "
                        "decodes them, else 5)")  # fmt: skip
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from ldm.serve.a1111 import Limits
        from ldm.serve.api import ServeConfig, create_app
    except ImportError as exc:
        raise LdmError(f"serving needs the serve extra ({exc.name} is missing): pip install -e \".[serve]\"") from None
    auth = None
    if args.api_auth is not None:
        user, colon, password = args.api_auth.partition(":")
        if not colon or not user or not password:
            raise LdmError("--api-auth takes USER:PASS, both non-empty")
        auth = (user, password)
    for flag in ("max_side", "max_steps", "max_images", "max_body", "port"):
        if getattr(args, flag) < 1:
            raise LdmError(f"--{flag.replace('_', '-')} must be at least 1")
    backend = Backend(args.backend)
    check(backend=backend, dtype=args.dtype, device=resolve_device(args.device).type)  # as generate.py checks it
    limits = Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                    max_body=args.max_body)  # fmt: skip
    if args.embeddings_dir is not None and not args.embeddings_dir.is_dir():
        raise LdmError(f"--embeddings-dir {args.embeddings_dir} is not a folder; pass the embeddings' folder")
    config = ServeConfig(models_dir=args.models_dir, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                         model=args.model, out=None if args.no_save else args.out, device=args.device, dtype=args.dtype,
                         limits=limits, auth=auth, backend=backend,
                         preview_every=None if args.preview_every is None else max(0, args.preview_every))  # fmt: skip
    app = create_app(config)
    uvicorn.run(app, host="0.0.0.0" if args.listen else "127.0.0.1", port=args.port, log_level="info")
    return 0


def entry() -> None:
    exit_now(run_cli(main))
