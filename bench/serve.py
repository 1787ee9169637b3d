"""The HTTP API's overhead: ``POST /sdapi/v1/txt2img`` against generate.py's own in-process path, same request.

One process holds both contenders: ``generate.py`` (its settings resolved once, then
:func:`ldm.cli.generate.write_images` per run: sampling, decoding and the PNG written, as generate.py does) and the
API (the ``python -m ldm serve`` app on uvicorn in a thread of the same process, a free local port, images saved as
the server saves them, answered as base64 PNGs to an httpx client). Each is warmed up with one run (the server loads
its model there), then the contenders take ``--serve-turns`` turns (one run each per turn, the order swapped every
turn). The request: one 64×64 image of "red apple", ``--serve-steps`` DPM++ 2M steps, guidance 7.5, seed 0, fp32.
Overhead = median over the turns of (API seconds / generate.py seconds in that turn) - 1, with its quartiles.
``api-watched`` is the API with a client polling ``/sdapi/v1/progress`` during the request as the web page does:
every 250 ms, asking for a preview (a VAE decode on the worker) on every fourth call.

    python bench/serve.py --threads 2 [--serve-turns 10] [--serve-steps 20]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Timer, quartiles, run_worker, script_main, script_parser, set_threads, table

PROMPT, SAMPLER, GUIDANCE, SIZE, SEED = "red apple", "DPM++ 2M", 7.5, 64, 0
CONTENDERS = {
    "generate.py": "generate.py's path in process (`write_images`)",
    "api": "`POST /sdapi/v1/txt2img` (uvicorn, same process)",
    "api-watched": "the same, watched as the web page does (`/progress` 4×/s, a preview 1×/s)",
}


def worker(args) -> dict:
    import httpx
    import torch

    from ldm.cli.generate import build_parser, load_model, plan_batches, resolve_settings, write_images
    from ldm.pipeline.schedule import SAMPLERS
    from ldm.serve.api import ServeConfig
    from ldm.serve.background import BackgroundServer

    set_threads(args.threads)
    torch.set_grad_enabled(False)
    model, scratch = Path(args.model).resolve(), Path(tempfile.mkdtemp(prefix="ldm-bench-serve-"))
    sampler = next(name for name, s in SAMPLERS.items() if s.label == SAMPLER)
    argv = [PROMPT, "--model", str(model), "--steps", str(args.serve_steps), "--sampler", sampler, "--cfg",
            str(GUIDANCE), "--seed", str(SEED), "--width", str(SIZE), "--height", str(SIZE), "--device", "cpu",
            "--out", str(scratch / "cli"), "--quiet"]  # fmt: skip
    settings = resolve_settings(build_parser().parse_args(argv))
    bundle = load_model(settings, quiet=True)
    server = BackgroundServer(ServeConfig(models_dir=model.parent, model=model.name, out=scratch / "api", device="cpu"))
    url = server.url
    client = httpx.Client(base_url=url, timeout=600)
    body = {"prompt": PROMPT, "steps": args.serve_steps, "sampler_name": SAMPLER, "cfg_scale": GUIDANCE, "seed": SEED,
            "width": SIZE, "height": SIZE}  # fmt: skip
    counts: dict[str, int] = {}  # images answered / written: one each

    def api(watched: bool) -> None:
        stop = threading.Event()

        def watch():
            with httpx.Client(base_url=url, timeout=60) as watcher:
                for n in itertools.count():  # as the web page polls: four times a second, a preview once a second
                    if stop.wait(0.25):
                        return
                    watcher.get("/sdapi/v1/progress", params={"skip_current_image": n % 4 != 0})

        watcher = threading.Thread(target=watch)
        if watched:
            watcher.start()
        r = client.post("/sdapi/v1/txt2img", json=body)
        stop.set()
        if watched:
            watcher.join()
        r.raise_for_status()
        counts["api"] = len(r.json()["images"])

    def cli() -> None:
        with open("/dev/null", "w") as quiet:  # write_images prints each path
            stdout, sys.stdout = sys.stdout, quiet
            try:
                written = write_images(bundle, settings, plan_batches(settings), scratch / "cli", progress=False)
            finally:
                sys.stdout = stdout
        counts["generate.py"] = len(written)

    runs = {"generate.py": cli, "api": lambda: api(False), "api-watched": lambda: api(True)}
    for run in runs.values():
        run()  # warm-up; the server loads its model here
    names = list(runs)
    walls: dict[str, list[float]] = {name: [] for name in names}
    cpus: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(args.serve_turns):
        order = names if turn % 2 == 0 else names[::-1]
        for name in order:
            with Timer() as t:
                runs[name]()
            walls[name].append(t.wall)
            cpus[name].append(t.cpu)
    client.close()
    server.close()
    assert counts == {"generate.py": 1, "api": 1}, counts
    return {"turns": args.serve_turns, "wall": walls, "cpu": cpus, "origin": f"trained weights from {model}"}


def section(args, workdir: Path) -> tuple[str, dict]:
    result = run_worker(Path(__file__).resolve(), ["--model", args.serve_model, "--serve-steps", args.serve_steps,
                                                   "--serve-turns", args.serve_turns], threads=args.threads,
                        log=workdir / "serve.log")  # fmt: skip
    walls, base = result["wall"], result["wall"]["generate.py"]
    rows = []
    for name, label in CONTENDERS.items():
        overhead = [w / b - 1 for w, b in zip(walls[name], base, strict=True)]
        rows.append([label, f"{statistics.median(walls[name]):.3f}{quartiles(walls[name])}",
                     f"{statistics.median(result['cpu'][name]):.3f}",
                     "–" if name == "generate.py" else f"{100 * statistics.median(overhead):+.1f} %"
                     + quartiles([100 * x for x in overhead]).replace(")", " %)")])  # fmt: skip
    text = "\n".join([
        f"### The HTTP API against generate.py: emoji-tiny, {SIZE}×{SIZE}, {args.serve_steps} steps {SAMPLER}",
        "",
        f"{result['origin']}; {result['turns']} turns in one process (order swapped every turn) after a warm-up run "
        "each. Overhead = median over the turns of the API's seconds / generate.py's in that turn - 1 (quartiles in "
        "brackets).",
        "",
        table(["contender", "s / image (wall)", "CPU s / image", "overhead"], rows),
        "",
    ])  # fmt: skip
    return text, result


def add_section_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve-steps", type=int, default=20)
    p.add_argument("--serve-turns", type=int, default=10, help="turns of the contenders in one process")
    p.add_argument("--serve-model", type=Path, default=ROOT / "models" / "emoji-tiny", help="the bundle served")


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--model")
    add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
