"""The tiny autoencoder (``generate.py --tiny-vae``, the server's previews) beside the bundle's VAE: how close the
tiny decoder's pixels are to the full decoder's, and how long each takes to decode.

PSNR and SSIM of the tiny decoder against the full one: on the VAE's latents of the held-out images (posterior
means; ``ldm.train.tiny_vae.compare_decoders``, as the training run's eval.json), and on the latents the UNet makes
for the first ``--tiny-prompts`` prompts of docs/eval-prompts.txt (generate.py's defaults, one seed each), which is
what ``--tiny-vae`` decodes. Time: one process, fp32, the two decoders take turns (``--tiny-turns``), each turn the
best of 3 calls on the same latents; s / image = the median over the turns / the batch.

    python bench/tiny_vae.py --threads 2 --tiny-data data/emoji-64/test [--model models/emoji-tiny]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, run_worker, script_main, script_parser, set_threads, table


def worker(args) -> dict:
    import torch

    from ldm.data import DataConfig
    from ldm.eval.metrics import psnr, ssim
    from ldm.formats.bundle import load_bundle
    from ldm.images import signed_to_unit
    from ldm.models.autoencoder import decode_latents
    from ldm.models.tiny_autoencoder import tiny_decode
    from ldm.pipeline import Request, generate
    from ldm.pipeline.schedule import get_sampler
    from ldm.train.tiny_vae import compare_decoders

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    bundle = load_bundle(args.model).to(dtype=torch.float32)
    if bundle.tiny_vae is None:
        raise SystemExit(f"{args.model} has no tiny autoencoder; train one with train_tiny_vae.py")
    scale = bundle.config.vae.scaling_factor
    held_data = DataConfig(path=args.tiny_data, resolution=bundle.config.default_size)
    held = compare_decoders(bundle, bundle.tiny_vae, held_data)

    prompts = (ROOT / "docs" / "eval-prompts.txt").read_text().split("\n")[: args.tiny_prompts]
    made = []
    for start in range(0, len(prompts), 8):
        batch = prompts[start : start + 8]
        request = Request(prompts=batch, negative_prompts=[""] * len(batch), seeds=list(range(start, start + len(batch))),
                          steps=20, guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=64, height=64)  # fmt: skip

        def keep(done, total, latents):
            if done == total:
                made.append(latents.clone())

        generate(bundle, request, progress=False, on_step=keep)
    latents = torch.cat(made)  # (N, C, h, w): the UNet's final latents
    full = signed_to_unit(decode_latents(bundle.vae, latents, scaling_factor=scale))
    fast = signed_to_unit(tiny_decode(bundle.tiny_vae, latents))
    generated = {"psnr": psnr(full, fast).mean().item(), "ssim": ssim(full, fast).mean().item(), "count": len(full)}

    decoders = {"full": lambda z: decode_latents(bundle.vae, z, scaling_factor=scale),
                "tiny": lambda z: tiny_decode(bundle.tiny_vae, z)}  # fmt: skip
    times = {}
    for batch in args.tiny_batches:
        z = latents[:1].repeat(batch, 1, 1, 1)
        for decode in decoders.values():
            decode(z)  # warm-up
        turns = {name: [] for name in decoders}
        for _ in range(args.tiny_turns):
            for name, decode in decoders.items():
                best = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    decode(z)
                    best = min(best, time.perf_counter() - started)
                turns[name].append(best / batch)
        times[batch] = turns
    params = {"full": sum(p.numel() for p in bundle.vae.decoder.parameters()) + sum(
        p.numel() for p in bundle.vae.post_quant_conv.parameters()),
        "tiny": sum(p.numel() for p in bundle.tiny_vae.decoder.parameters())}  # fmt: skip
    return {"held_out": held, "generated": generated, "times": times, "params": params}


def section(args, workdir: Path) -> tuple[str, dict]:
    r = run_worker(Path(__file__).resolve(), [
        "--model", args.model, "--tiny-data", args.tiny_data, "--tiny-prompts", args.tiny_prompts,
        "--tiny-turns", args.tiny_turns, "--tiny-batches", *args.tiny_batches,
    ], threads=args.threads, log=workdir / "tiny_vae.log")  # fmt: skip
    held, generated = r["held_out"], r["generated"]
    shown = Path(args.tiny_data).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    quality = table(["latents", "images", "PSNR tiny vs full decoder", "SSIM"], [
        [f"held-out images' (`{shown}`)", held["count"], f"{held['decoder_psnr']:.2f} dB", f"{held['decoder_ssim']:.3f}"],
        ["the UNet's, for docs/eval-prompts.txt", generated["count"], f"{generated['psnr']:.2f} dB", f"{generated['ssim']:.3f}"],
    ])  # fmt: skip
    rows = []
    for batch, turns in r["times"].items():
        full, tiny = statistics.median(turns["full"]), statistics.median(turns["tiny"])
        rows.append([batch, f"{full * 1e3:.2f}", f"{tiny * 1e3:.2f}", f"{full / tiny:.1f}×"])
    speed = table(["batch", "full decoder ms / image", "tiny decoder ms / image", "speed-up"], rows)
    notes = (f"Decoder weights: full {r['params']['full']:,}, tiny {r['params']['tiny']:,}. Round trip of the "
             f"held-out images through the tiny encoder and decoder: {held['roundtrip_psnr']:.2f} dB against the "
             f"images (the full VAE's: {held['vae_roundtrip_psnr']:.2f} dB); the tiny encoder's latents are "
             f"{held['encoder_rmse']:.3f} RMS from the VAE's (unit-variance latents).")  # fmt: skip
    return f"{quality}\n\n{speed}\n\n{notes}", r


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "emoji-tiny")
    p.add_argument("--tiny-data", default=str(ROOT / "data" / "emoji-64" / "test"), help="held-out images")
    p.add_argument("--tiny-prompts", type=int, default=32)
    p.add_argument("--tiny-turns", type=int, default=5)
    p.add_argument("--tiny-batches", type=int, nargs="+", default=[1, 8])
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
