"""Training on 1 and 2 CPU processes: what the multi-process mechanics cost, on emoji-tiny.

Each row runs ``train_unet.py`` (``bench/training.py``'s timed worker: a time stamp at the start of every step, the
feature cache build timed on its own) under ``torchrun --standalone --nproc_per_node P`` with ``T`` threads per
process, on the same data and global batch: 1 × T (one process, all the threads), P × T/P (DDP over gloo, the same
threads shared out) and 1 × T/P (one process alone on the threads one of the P has, the base of the scaling
efficiency). The runs take turns, ``--rounds`` times; the table gives medians. On a 2-core machine two processes
cannot be faster than one using both cores: the point is what the all-reduce of the gradients, the split batches and
the parallel cache build cost or save against that.

    python bench/scale_out.py --threads 2 [--rounds 2] [--train-steps 30] [--batch-size 16] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training
from common import ROOT, bench_bundle, script_main, script_parser, table


def worker(args) -> dict:
    """One process of a run: bench/training.py's cached-loop worker; process 0 writes the result to ``--result``."""
    import torch.distributed as dist

    result = training.worker(argparse.Namespace(**vars(args), mode="cache"))
    rank = int(os.environ.get("RANK", "0"))
    steps = [result["s_per_step"]]
    if dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result["s_per_step"])
        steps = gathered
    result |= {"processes": len(steps), "s_per_step": max(steps)}  # the slowest process sets the pace
    result["images_per_s"] = args.batch_size / result["s_per_step"]
    if rank == 0:
        Path(args.result).write_text(json.dumps(result))
    return result


def launch(script: Path, *, processes: int, threads: int, argv: list, result: Path, log: Path) -> dict:
    """``torchrun`` of ``processes`` workers with ``threads`` threads each; process 0's result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(script), "--worker", *map(str, argv), "--threads", str(threads), "--result", str(result)]  # fmt: skip
    print("  $", " ".join(cmd[1:]), flush=True)
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def section(args, workdir: Path) -> tuple[str, dict]:
    script = Path(__file__).resolve()
    bundle_dir, origin = bench_bundle("emoji-tiny", workdir, model_dir=args.emoji_model)
    data = training.write_data(workdir / f"scale-shapes-{args.images}", count=args.images)
    per = max(1, args.threads // 2)
    runs = {f"1 process × {args.threads} threads": (1, args.threads),
            f"2 processes × {per} thread{'s' if per > 1 else ''} (DDP over gloo)": (2, per),
            f"1 process × {per} thread{'s' if per > 1 else ''}": (1, per)}  # fmt: skip
    measured: dict[str, list[dict]] = {name: [] for name in runs}
    for turn in range(args.rounds):
        for name, (processes, threads) in runs.items():
            out = workdir / f"scale-{processes}x{threads}"
            shutil.rmtree(out, ignore_errors=True)
            argv = ["--bundle", bundle_dir, "--data", data, "--steps", args.train_steps, "--warmup",
                    args.train_warmup, "--batch-size", args.batch_size, "--out", out]  # fmt: skip
            print(f"turn {turn + 1}: {name}", flush=True)
            measured[name].append(launch(script, processes=processes, threads=threads, argv=argv,
                                         result=workdir / "scale-result.json", log=workdir / "scale_out.log"))  # fmt: skip
    med = {name: {key: statistics.median(r[key] for r in rs) for key in ("s_per_step", "cache_build_s")}
           for name, rs in measured.items()}  # fmt: skip
    first, two, alone = list(runs)
    rows = [[name, f"{m['s_per_step']:.3f}", f"{args.batch_size / m['s_per_step']:.1f}",
             f"{med[first]['s_per_step'] / m['s_per_step']:.2f}×", f"{m['cache_build_s']:.1f}"]
            for name, m in med.items()]  # fmt: skip
    efficiency = med[alone]["s_per_step"] / (2 * med[two]["s_per_step"])
    text = "\n".join([
        f"### UNet training on 1 and 2 CPU processes, emoji-tiny ({origin})",
        "",
        f"{args.images} rendered 64×64 images with captions, global batch {args.batch_size}, fp32, AdamW, feature cache "
        f"built in the run; {args.train_steps} steps, the first {args.train_warmup} and the last left out of the "
        f"timing; median of {args.rounds} turns.",
        "",
        table(["run", "s / step", "images / s", "against 1 process", "cache build s"], rows),
        "",
        f"Scaling efficiency of the 2 processes against one of them alone: {efficiency:.0%} "
        f"(images/s of the pair over twice that of 1 process × {per} thread{'s' if per > 1 else ''}).",
        "",
    ])  # fmt: skip
    return text, measured


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--bundle")
    p.add_argument("--data")
    p.add_argument("--out")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--result")
    training.add_section_arguments(p)
    script_main(p.parse_args(), worker, section)


if __name__ == "__main__":
    main()
