"""Run every benchmark in one go and write BENCHMARKS.md (the raw numbers go to WORKDIR/benchmarks.json).

    python bench/run.py --threads 2                      # everything: emoji-tiny and sd-v1 at 256×256
    python bench/run.py --threads 2 --skip-sd --turns 5 --out /tmp/BENCH.md     # a quick run

Sections: generation (ours, ours --fast and diffusers, side by side), UNet training (feature cache against encoding
every step), UNet efficiency (FLOPs per second against the measured matmul peak), 3×3 convolutions (direct against
Winograd), token merging (the fast path with and without it: speed and image change) and the HTTP API's overhead
over generate.py's path (needs the serve extra). Model bundles, the
diffusers exports and the training data are made once in --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convolution
import efficiency
import generation
import serve
import token_merging
import training
from common import DEFAULT_WORKDIR, ROOT, machine, machine_markdown

SECTIONS = {
    "generation": generation, "training": training, "efficiency": efficiency, "convolution": convolution,
    "token_merging": token_merging, "serve": serve,
}  # fmt: skip


def main() -> None:
    from ldm.accel.fast import physical_cores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=physical_cores(), help="threads per worker (default: physical cores)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="bundles, exports, data, logs (reused)")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    for module in SECTIONS.values():
        module.add_section_arguments(p)
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0])), *sys.argv[1:]])
    info = machine(args.threads)
    started = time.monotonic()
    texts, results = [], {"machine": info, "command": command}
    for name in args.only:
        print(f"== {name}", flush=True)
        text, data = SECTIONS[name].section(args, args.workdir)
        texts.append(text)
        results[name] = data
    minutes = (time.monotonic() - started) / 60
    header = [
        "# Benchmarks",
        "",
        f"Written by `bench/run.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {minutes:.0f} minutes. Re-run with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Machine",
        "",
        machine_markdown(info),
        "",
        (
            "Wall-clock seconds are the figures of merit; CPU seconds are shown beside them because a machine shared "
            "with other jobs stretches wall time more than CPU time (at one thread, CPU ≈ wall on an idle machine)."
        ),
        "",
        "## Results",
        "",
    ]
    args.out.write_text("\n".join(header + texts))
    raw = args.workdir / "benchmarks.json"
    raw.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}, and the raw numbers to {raw}")


if __name__ == "__main__":
    main()
