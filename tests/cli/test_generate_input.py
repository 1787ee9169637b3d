"""generate.py and bundle create against bad input: every case ends at once with one ``error:`` line and exit 2,
or succeeds with its images; never a traceback, a hang, a silent wrong result or a half-made output."""

from __future__ import annotations

import random
import signal
from contextlib import contextmanager

import pytest
from PIL import Image, PngImagePlugin

from ldm.cli import bundle as bundle_cli
from ldm.cli import generate
from ldm.cli.common import run_cli
from ldm.config import to_dict
from ldm.formats.pngmeta import read_png_parameters
from ldm.models.presets import PRESETS

HANG_GUARD_S = 20  # a case that has not answered by then hangs; each answers in well under a second


@contextmanager
def no_hang(seconds: int = HANG_GUARD_S):
    """Fail, rather than wait, where a case would run on and on (a guard against hangs, not a speed check)."""

    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(main, argv, capsys) -> tuple[int, str]:
    """``main(argv)`` as the command runs it: its exit status and stderr (argparse's refusals exit 2 too)."""
    with no_hang():
        try:
            code = run_cli(main, [str(a) for a in argv])
        except SystemExit as exit:
            code = exit.code
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, message: str = "") -> None:
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert code == 2, (code, err)
    assert len(lines) == 1 and ("error: " in lines[0]) and "Traceback" not in err, err
    assert message in lines[0], (message, lines[0])


def png_recording(path, parameters: str):
    image = Image.new("RGB", (8, 8), "white")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)
    return path


RECORD = "red apple\nSteps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 3, Size: {size}, Batch size: {batch}, Batch pos: {pos}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["x", "--cfg", "nan"], "guidance scale must be a finite number"),  # ran unguided, recorded 'CFG scale: nan'
        (["x", "--cfg", "inf"], "guidance scale must be a finite number"),  # wrote a black image
        (["x", "--lora-scale", "nan"], "--lora-scale must be a finite number"),
        (["x", "--seed", str(2**70)], "out of range: seeds run from 0 to 2^63 - 1"),
        (["x", "--seed", str(2**63 - 1), "-n", "2"], "passes 2^63 - 1; pass a smaller --seed"),
        (["x", "--steps", "100000000"], "steps must be at most 1000"),  # a hang
        (["x", "--width", "100000"], "width must be at most 16384 pixels"),  # a hang
        (["x", "--width", "16384", "--height", "16384", "--batch-size", "64"], "needs about"),
        (["x", "--width", "4096", "--height", "4096", "--batch-size", "64"], "more than the"),
        (["x", "-n", "100000000"], "more than 100,000; split the job"),  # a hang
        (["x", "--batch-size", "100000000"], "more than 100,000"),
        (["x", "-n", "0"], "must be at least 1"),
        (["\udcff\udcfe"], "is not valid UTF-8 text"),  # a non-UTF-8 argv
        (["x", "--negative-prompt", "caf\udce9"], "is not valid UTF-8 text"),
    ],
)
def test_bad_settings(micro_bundle_dir, tmp_path, capsys, argv, message):
    code, err = outcome(generate.main, [*argv, "--model", micro_bundle_dir, "--out", tmp_path / "out"], capsys)
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "out").exists()  # refused before any work, the output folder included


@pytest.mark.parametrize(
    "out, message",
    [("a-file", "is an existing file, not a folder"), ("a-file/sub", "is a file, so nothing can be written under it"),
     ("/proc/ldm/x", "cannot write to --out")],
)  # fmt: skip
def test_output_folder_is_checked_before_the_work(micro_bundle_dir, tmp_path, capsys, out, message):
    (tmp_path / "a-file").write_text("keep me")
    path = out if out.startswith("/") else tmp_path / out
    code, err = outcome(generate.main, ["x", "--model", micro_bundle_dir, "--out", path], capsys)
    assert_one_error_line(code, err, message)
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize(
    "record, message",
    [
        (RECORD.format(size="64x64", batch=0, pos=0), "'Batch pos: 0' of 'Batch size: 0'"),
        (RECORD.format(size="64x64", batch=2, pos=5), "'Batch pos: 5' of 'Batch size: 2'"),  # exited 0, wrote nothing
        (RECORD.format(size="64x64", batch=100000000, pos=0), "more than the"),  # a hang
        (RECORD.format(size="100000x100000", batch=1, pos=0), "must be at most 16384 pixels"),
        (RECORD.format(size="16384x16384", batch=64, pos=0), "needs about"),
        (RECORD.format(size="64x64", batch=1, pos=0).replace("Seed: 3", f"Seed: {2**70}"), "seed"),
        ("x" * 20_000_000, "more than the 65,536 that settings take"),  # a 20 MB text chunk
    ],
)
def test_bad_from_png_records(micro_bundle_dir, tmp_path, capsys, record, message):
    png = png_recording(tmp_path / "in.png", record)
    code, err = outcome(generate.main, ["--from-png", png, "--model", micro_bundle_dir, "--out", tmp_path / "o"], capsys)
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "o").exists()


GOOD_AND_BAD = {  # each flag's pool: values that must work, and values that must be refused
    "--steps": ["1", "2", "0", "-1", "1001", "two"],
    "--cfg": ["0", "1", "7.5", "-1", "nan", "inf", "-inf"],
    "--width": ["32", "64", "0", "65", "-8", "100000"],
    "--height": ["64", "7", "4096"],
    "-n": ["1", "2", "0", "100000000"],
    "--batch-size": ["1", "2", "0", "-1"],
    "--seed": ["0", "5", "-1", str(2**64), "x"],
    "--sampler": ["euler_a", "Euler a", "ddim", "nope", ""],
    "--deep-cache": ["0", "2", "1", "-2"],
    "--token-merging": ["0", "0.5", "1", "nan", "-0.1"],
    "--dtype": ["fp32", "bf16", "fp64"],
    "--negative-prompt": ["", "blurry", "caf\udce9"],
}


def fuzz_cases(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        flags = rng.sample(sorted(GOOD_AND_BAD), k=rng.randint(1, 4))
        cases.append([item for flag in flags for item in (flag, rng.choice(GOOD_AND_BAD[flag]))])
    return cases


@pytest.mark.slow
def test_fuzzed_flags_give_images_or_one_error_line(micro_bundle_dir, tmp_path, capsys):
    """Seeded random combinations of good and bad flag values: exit 0 with every image it announced, or exit 2
    with one error line; nothing else (no traceback, no exit 70, no success without its images)."""
    outcomes = {0: 0, 2: 0}
    for i, flags in enumerate(fuzz_cases(40, seed=0)):
        out = tmp_path / f"run{i}"
        argv = ["red apple", "--model", micro_bundle_dir, "--out", out, "--quiet", "--steps", "1", *flags]
        code, err = outcome(generate.main, argv, capsys)
        if code == 0:
            pngs = sorted(out.glob("*.png"))
            n = int(dict(zip(argv[::2], argv[1::2])).get("-n", 1)) if "-n" in argv else 1
            assert len(pngs) == n, (flags, pngs)
            assert all("Steps: " in read_png_parameters(p) for p in pngs)
        else:
            assert_one_error_line(code, err)
        outcomes[code] += 1
    assert outcomes[0] >= 5 and outcomes[2] >= 5, outcomes  # the pools reach both kinds of outcome


def leaf_keys(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


SET_VALUES = ["-1", "0", "1", "3", "100000", "[8, 8]", "[100000, 100000]", "x", "1.5", "null", "true", ".nan",
              str(2**70), "[&a 1, *a]"]  # fmt: skip


@pytest.mark.slow
def test_fuzzed_set_overrides_give_a_bundle_or_one_error_line(tmp_path, capsys):
    """``bundle create micro --set KEY=VALUE`` over every key of the model config: a bundle that loads, or one
    error line; a bundle that reports success is one that works."""
    from ldm.formats.bundle import load_bundle

    rng = random.Random(1)
    keys = sorted(leaf_keys(to_dict(PRESETS["micro"])))
    made = refused = 0
    for i in range(30):
        sets = [f"{rng.choice(keys)}={rng.choice(SET_VALUES)}" for _ in range(rng.randint(1, 2))]
        out = tmp_path / f"b{i}"
        code, err = outcome(bundle_cli.main, ["create", "micro", out, *[a for s in sets for a in ("--set", s)]], capsys)
        if code == 0:
            load_bundle(out)
            made += 1
        else:
            assert_one_error_line(code, err)
            refused += 1
    assert made >= 1 and refused >= 10, (made, refused)
