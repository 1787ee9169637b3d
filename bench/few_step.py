"""Few-step generation and the runtimes: an LCM-LoRA at 4, 2 and 1 steps, and OpenVINO, against 20-step sampling, end
to end, in one process.

Contenders, all on emoji-tiny (or ``--model``, ``--preset``) with the prompt "red apple" at batch 1, seed 0, each warmed up once, then taking
``--turns`` turns (one image each per turn, the order rotated every turn) so that a slow spell of a shared machine
hits them alike:

- ``diffusers-20``: diffusers' StableDiffusionPipeline on the bundle's export, DPM++ 2M, 20 steps, CFG 7.5;
- ``ours-20``: ldm.pipeline.generate with the same request;
- ``fast-20``: the same through ldm.accel.prepare(fast=True), as generate.py prepares a one-image job;
- ``fast-20-graphs``: the same with the traced graphs (ldm.accel.graph), what the fast path takes for long jobs;
- ``openvino-f32-20``: the same with the UNet run by OpenVINO (ldm.accel.openvino, ``--backend openvino``), fp32;
- ``openvino-default-20``: the same at the runtime's default precision (bf16 on CPUs with native bf16);
- ``lcm-N``: the bundle with the LCM-LoRA merged (``--lora``), the LCM sampler, N steps, CFG 1 (one UNet call a step);
- ``lcm-N-tiny``: the same, decoded by the bundle's tiny autoencoder, when it has one.

s / image is the median over the turns; speed-up = median over the turns of diffusers-20's time in that turn / the
contender's; "first image" is the warm-up's time (tracing, OpenVINO's conversion and compilation included). Where the
contenders' images should agree (ours, the fast path and OpenVINO against diffusers) the table gives the largest pixel
difference; the LCM rows are another model's images and give none. Without the openvino package its rows are left
out (pip install 'ldm[openvino]'); ``--no-openvino`` leaves them out too. ``--unet-calls N`` then races the 20-step
contenders' UNets alone on one guided step, call by call, a measurement a busy machine disturbs less than whole
images.

    python bench/few_step.py --threads 2 --lora models/lora/emoji-tiny-lcm.safetensors [--turns 8] [--unet-calls 40]
    python bench/few_step.py --threads 2 --preset sd-v1 --size 256 --turns 2 --no-graphs --share-modules   # sd-v1 at 256×256
    # prints a Markdown section
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    bench_bundle,
    exported,
    image_change,
    machine,
    machine_markdown,
    quartiles,
    script_parser,
    set_threads,
    table,
)

PROMPT, SEED = "red apple", 0
EXACT = ("ours-20", "fast-20", "fast-20-graphs", "openvino-f32-20", "openvino-default-20")  # diffusers' images, rounded


def contenders(args) -> tuple[dict, dict]:
    """name → a function that makes one image and returns it as a (1, 3, H, W) numpy array in [0, 1]; and name → the
    bundle it samples with, for the 20-step contenders of ours (the UNet race)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ldm.accel import prepare
    from ldm.formats.bundle import load_bundle
    from ldm.pipeline import Request, generate
    from ldm.pipeline.schedule import get_sampler
    from ldm.train.lora import apply_lora

    model = Path(args.model) if args.preset is None else bench_bundle(args.preset, args.workdir)[0]
    bundle = load_bundle(model).to("cpu", torch.float32)
    size = args.size or bundle.config.vae.sample_size
    shared = {"unet": bundle.unet, "vae": bundle.vae, "text_encoder": bundle.text_encoder.model} if args.share_modules else {}
    pipe = StableDiffusionPipeline.from_pretrained(exported(model, args.workdir), local_files_only=True,
                                                   torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **shared)  # fmt: skip
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

    twenty = request(20, 7.5, "dpmpp_2m")
    fast = prepare(copy.deepcopy(bundle), fast=True, unet_calls=40)
    runs = {"diffusers-20": diffusers_20, "ours-20": ours(bundle, twenty), "fast-20": ours(fast, twenty)}
    bundles = {"ours-20": bundle, "fast-20": fast}
    if not args.no_graphs:
        bundles["fast-20-graphs"] = prepare(copy.deepcopy(bundle), fast=True)
        runs["fast-20-graphs"] = ours(bundles["fast-20-graphs"], twenty)
    if not args.no_openvino and importlib.util.find_spec("openvino") is not None:
        from ldm.accel.openvino import OpenVinoConfig, OpenVinoUNet, Precision

        for precision in Precision:
            converted = copy.copy(bundle)  # the same modules, the UNet wrapped (converted on its first call)
            converted.unet = OpenVinoUNet(bundle.unet, OpenVinoConfig(precision=precision))
            runs[f"openvino-{precision.value}-20"] = ours(converted, twenty)
            bundles[f"openvino-{precision.value}-20"] = converted
    if args.lora:
        student = apply_lora(copy.deepcopy(bundle), args.lora, scale=1.0)
        for steps in args.lcm_steps:
            runs[f"lcm-{steps}"] = ours(student, request(steps, 1.0, "lcm"))
            if getattr(student, "tiny_vae", None) is not None:
                runs[f"lcm-{steps}-tiny"] = ours(student, request(steps, 1.0, "lcm", tiny_vae=True))
    return runs, bundles


def unet_race(bundles: dict, calls: int) -> dict[str, list[float]]:
    """Seconds per UNet call of each bundle's UNet on one guided step of batch 1 (the (2, C, h, w) input the loop
    passes, the prompt's and the empty prompt's encodings), ``calls`` rounds of one call each, the order rotated."""
    import torch

    from ldm.pipeline import encode_prompts

    first = next(iter(bundles.values()))
    c = first.unet.config
    torch.manual_seed(0)
    sample, timestep = torch.randn(2, c.in_channels, c.sample_size, c.sample_size), torch.tensor(500)
    context = encode_prompts(first, ["", PROMPT])  # (2, L, D), one tensor for every call, as in a sampling run
    times: dict[str, list[float]] = {name: [] for name in bundles}
    names = list(bundles)
    with torch.no_grad():
        for name in names:  # the shapes traced and compiled, where they were not yet
            bundles[name].unet(sample, timestep, encoder_hidden_states=context)
        for turn in range(calls):
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                started = time.perf_counter()
                bundles[name].unet(sample, timestep, encoder_hidden_states=context)
                times[name].append(time.perf_counter() - started)
    return times


def measure(args) -> tuple[dict[str, list[float]], dict[str, object], dict[str, float], dict[str, list[float]]]:
    runs, bundles = contenders(args)
    images, first = {}, {}
    for name, run in runs.items():  # warm-up, and the images compared
        started = time.perf_counter()
        images[name] = run()
        first[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for turn in range(args.turns):
        order = names[turn % len(names):] + names[: turn % len(names)]
        for name in order:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return times, images, first, unet_race(bundles, args.unet_calls) if args.unet_calls else {}


def section(args) -> str:
    times, images, first, calls = measure(args)
    reference = times["diffusers-20"]
    rows = []
    for name, values in times.items():
        speedup = statistics.median(r / v for r, v in zip(reference, values))
        check = "—"
        if name in EXACT:
            worst, worst_uint8, _, _ = image_change(images[name], images["diffusers-20"])
            check = f"{worst:.1e} ({worst_uint8}/255)"
        rows.append([name, f"{statistics.median(values):.3f}", f"{speedup:.2f}×", check, f"{first[name]:.1f}"])
    header = ["contender", "s / image", "speed-up over diffusers-20", "max |Δ| vs diffusers-20", "first image s"]
    command = " ".join(["python bench/few_step.py", *sys.argv[1:]])
    text = f"`{command}`, {args.turns} turns\n\n" + table(header, rows)
    if any(name.startswith("openvino") for name in times):
        import openvino

        default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
        text += f"\n\nOpenVINO {openvino.get_version()}; its default precision on this CPU: {default}"
    if calls:
        reference = calls["ours-20"]
        rows = [[name.removesuffix("-20"), f"{1000 * statistics.median(v):.1f}{quartiles([1000 * x for x in v])}",
                 f"{statistics.median(r / x for r, x in zip(reference, v)):.2f}×"] for name, v in calls.items()]  # fmt: skip
        text += (f"\n\nThe UNet alone, one guided step at batch 1 (input (2, C, h, w)), {args.unet_calls} rounds of one "
                 "call each:\n\n" + table(["UNet", "ms / call (quartiles)", "speed-up over torch's UNet"], rows))  # fmt: skip
    return text


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--model", default=str(ROOT / "models" / "emoji-tiny"))
    p.add_argument("--preset", help="a random-weight bundle of this preset instead of --model (bench/common.py)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO rows")
    p.add_argument("--no-graphs", action="store_true", help="leave out the fast-20-graphs row")
    p.add_argument("--share-modules", action="store_true",
                   help="diffusers runs the bundle's own UNet, VAE and text encoder instead of the export's copies "
                        "(one copy of the weights less, for sd-v1; the export then gives only tokenizer and configs)")
    p.add_argument("--lora", type=Path, help="the LCM-LoRA (without it, only the 20-step rows)")
    p.add_argument("--lcm-steps", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--unet-calls", type=int, default=0, metavar="N",
                   help="then race the 20-step contenders' UNets alone, N rounds of one call each")  # fmt: skip
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # else the fast path sets one thread per core for the process
    set_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine_markdown(machine(args.threads)) + "\n\n" + section(args))


if __name__ == "__main__":
    main()
