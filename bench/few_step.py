"""Few-step generation: an LCM-LoRA at 4, 2 and 1 steps against 20-step sampling, end to end, in one process.

Contenders, all on emoji-tiny with the prompt "red apple" at batch 1, seed 0, each warmed up once, then taking
``--turns`` turns (one image each per turn, the order rotated every turn) so that a slow spell of a shared machine
hits them alike:

- ``diffusers-20``: diffusers' StableDiffusionPipeline on the bundle's export, DPM++ 2M, 20 steps, CFG 7.5;
- ``ours-20``: ldm.pipeline.generate with the same request;
- ``fast-20``: the same through ldm.accel.prepare(fast=True);
- ``lcm-N``: the bundle with the LCM-LoRA merged (``--lora``), the LCM sampler, N steps, CFG 1 (one UNet call a step);
- ``lcm-N-tiny``: the same, decoded by the bundle's tiny autoencoder, when it has one.

s / image is the median over the turns; speed-up = median over the turns of diffusers-20's time in that turn / the
contender's. Where the contenders' images should agree (ours and the fast path against diffusers) the table gives
the largest pixel difference; the LCM rows are another model's images and give none.

    python bench/few_step.py --threads 2 --lora models/lora/emoji-tiny-lcm.safetensors [--turns 8]
    # prints a Markdown section
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, exported, image_change, machine, machine_markdown, script_parser, set_threads, table

PROMPT, SEED = "red apple", 0


def contenders(args) -> dict:
    """name → a function that makes one image and returns it as a (1, 3, H, W) numpy array in [0, 1]."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ldm.accel import prepare
    from ldm.formats.bundle import load_bundle
    from ldm.pipeline import Request, generate
    from ldm.pipeline.schedule import get_sampler
    from ldm.train.lora import apply_lora

    model = Path(args.model)
    bundle = load_bundle(model).to("cpu", torch.float32)
    size = bundle.config.vae.sample_size
    pipe = StableDiffusionPipeline.from_pretrained(exported(model, args.workdir), local_files_only=True,
                                                   torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)  # fmt: skip
    sampler = get_sampler("dpmpp_2m")
    pipe.scheduler = sampler.scheduler.from_config(pipe.scheduler.config, **dict(sampler.options))
    pipe.set_progress_bar_config(disable=True)

    def request(steps: int, guidance: float, sampler_name: str, *, tiny_vae: bool = False) -> Request:
        return Request(prompts=[PROMPT], negative_prompts=[""], seeds=[SEED], steps=steps, guidance_scale=guidance,
                       sampler=get_sampler(sampler_name), width=size, height=size, tiny_vae=tiny_vae)  # fmt: skip

    def ours(b, req):
        return lambda: generate(b, req, progress=False).numpy()

    def diffusers_20():
        out = pipe(PROMPT, num_inference_steps=20, guidance_scale=7.5, height=size, width=size, output_type="np",
                   generator=torch.Generator().manual_seed(SEED))  # fmt: skip
        return out.images.transpose(0, 3, 1, 2)

    fast = prepare(copy.deepcopy(bundle), fast=True, unet_calls=40)
    runs = {"diffusers-20": diffusers_20, "ours-20": ours(bundle, request(20, 7.5, "dpmpp_2m")),
            "fast-20": ours(fast, request(20, 7.5, "dpmpp_2m"))}  # fmt: skip
    if args.lora:
        student = apply_lora(copy.deepcopy(bundle), args.lora, scale=1.0)
        for steps in args.lcm_steps:
            runs[f"lcm-{steps}"] = ours(student, request(steps, 1.0, "lcm"))
            if getattr(student, "tiny_vae", None) is not None:
                runs[f"lcm-{steps}-tiny"] = ours(student, request(steps, 1.0, "lcm", tiny_vae=True))
    return runs


def measure(args) -> tuple[dict[str, list[float]], dict[str, object]]:
    runs = contenders(args)
    images = {name: run() for name, run in runs.items()}  # warm-up, and the images compared
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for turn in range(args.turns):
        order = names[turn % len(names):] + names[: turn % len(names)]
        for name in order:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return times, images


def section(args) -> str:
    times, images = measure(args)
    reference = times["diffusers-20"]
    rows = []
    for name, values in times.items():
        speedup = statistics.median(r / v for r, v in zip(reference, values))
        check = "—"
        if name in ("ours-20", "fast-20"):
            worst, worst_uint8, _, _ = image_change(images[name], images["diffusers-20"])
            check = f"{worst:.1e} ({worst_uint8}/255)"
        rows.append([name, f"{statistics.median(values):.3f}", f"{speedup:.2f}×", check])
    header = ["contender", "s / image", "speed-up over diffusers-20", "max |Δ| vs diffusers-20"]
    command = " ".join(["python bench/few_step.py", *sys.argv[1:]])
    return f"`{command}`, {args.turns} turns\n\n" + table(header, rows)


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--model", default=str(ROOT / "models" / "emoji-tiny"))
    p.add_argument("--lora", type=Path, help="the LCM-LoRA (without it, only the 20-step rows)")
    p.add_argument("--lcm-steps", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--turns", type=int, default=8)
    args = p.parse_args()
    set_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine_markdown(machine(args.threads)) + "\n\n" + section(args))


if __name__ == "__main__":
    main()
