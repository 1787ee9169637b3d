"""Training on several processes: two CPU processes over gloo train what one process trains, resume exactly, write
their outputs once; the launches that would run as separate trainers on one output folder are refused."""

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tb_events import logged_scalars
from test_train_unet import assert_same_checkpoints, checkpoint_tensors, write_shapes

from ldm.cli import train_unet, train_vae
from ldm.cli.common import run_cli
from ldm.data import DataConfig, scan_dataset
from ldm.data.shard_writer import shard_pattern, write_shards
from ldm.errors import LdmError
from ldm.formats.bundle import load_bundle
from ldm.train.cache import load_cache
from ldm.train.distributed import (
    BatchShard,
    Launch,
    acquire_lock,
    check_launch,
    check_processes,
    hold_output,
    launch_from_env,
    per_process_batch,
)
from ldm.train.objectives import offset_noise, sample_timesteps
from ldm.train.tasks import TaskInputConfig, random_masks

ROOT = Path(__file__).resolve().parents[2]
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not GLOO, reason="torch.distributed with the gloo backend is not available")

LR = 1e-3
# cache.batch_size=3: 3 VAE calls for the 8 images, which 2 processes share.
UNET = ["--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.warmup_steps=0",
        "--set", "validation.steps=2", "--set", f"train.lr={LR}", "--set", "train.ema_decay=0.9",
        "--set", "train.sample_every=100", "--set", "data.random_flip=0.5", "--set", "loss.caption_dropout=0.3",
        "--set", "loss.noise_offset=0.1", "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3",
        "--set", "cache.batch_size=3", "--max-steps", "4"]  # fmt: skip
# The discriminator is on from step 1, at 32 px and a quarter of its width: its gradients and the adaptive weight
# are averaged across the processes outside DDP, which this checks.
VAE = ["--preset", "micro", "--resolution", "32", "--set", "train.batch_size=4", "--set", "train.log_every=1",
       "--set", f"train.lr={LR}", "--set", "train.ema_decay=0.9", "--set", "loss.disc_start=1",
       "--set", "loss.disc_channels=16", "--set", "loss.learn_logvar=true", "--set", "data.random_flip=0.5",
       "--set", "scale_samples=8", "--set", "train.checkpoint_every=100", "--max-steps", "3"]  # fmt: skip

# Runs jobs in each of the processes torchrun starts: training commands, and the copy of a mid-run checkpoint into
# a fresh folder (what a run killed after that checkpoint leaves), made by process 0 while the others wait.
DRIVER = """
import json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from accelerate import Accelerator
from ldm.cli import train_unet, train_vae
from ldm.cli.common import run_cli
# A run ends by closing its trackers and the process group; the group is kept here for the next job.
Accelerator.end_training = lambda self: [tracker.finish() for tracker in self.trackers]
for job in json.loads(Path(sys.argv[1]).read_text()):
    if "copy" in job:
        if dist.get_rank() == 0:
            for source, target in job["copy"]:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
        dist.barrier()
        continue
    code = run_cli({"unet": train_unet.main, "vae": train_vae.main}[job["main"]], job["argv"])
    if code:
        sys.exit(code)
"""


def torchrun(tmp_path, jobs, *, processes=2):
    """The jobs in ``processes`` CPU processes under torchrun; its output. ACCELERATE_USE_CPU is left unset: on a
    machine without GPUs the runs pick the CPU themselves, as they must under a plain torchrun."""
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(tmp_path / "driver.py"), str(tmp_path / "jobs.json")]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def assert_close_weights(a: dict, b: dict, *, steps: int, atol: float = 2e-5):
    """Two sets of named weights agree entry by entry within ``atol``, but for entries whose gradient is zero up to
    rounding, which Adam moves by about ±lr whatever the gradient's size, so that rounding picks the sign:
    attention key biases (softmax ignores what shifts all of a query's logits alike) and a rare few others (at most
    1 in 10⁴: discriminator weights). Those may differ by at most 2·lr per step."""
    assert a.keys() == b.keys() and a
    off = total = 0
    for key in a:
        diff = (a[key].double() - b[key].double()).abs()
        assert diff.max() <= 2 * LR * steps, key
        if not key.endswith("to_k.bias"):
            off, total = off + int((diff > atol).sum()), total + diff.numel()
    assert off <= total * 1e-4, f"{off} of {total} entries differ by more than {atol}"


def trained(out: Path, checkpoint: str, part: str) -> dict:
    """What a run trained: the checkpoint's models (the training weights) and the bundle's ``part`` (the EMA's)."""
    weights = {k: v for k, v in checkpoint_tensors(out / checkpoint).items() if k.startswith("s.models.")}
    return weights | {f"bundle.{k}": v for k, v in load_bundle(out / "bundle").modules()[part].state_dict().items()}


def assert_same_losses(one: Path, two: Path, tag: str, steps: range):
    """``tag`` logged at ``steps`` by both runs, with the same values: the global batch's, logged once."""
    a, b = logged_scalars(one, tag), logged_scalars(two, tag)
    assert sorted(a) == sorted(b) == list(steps), (a, b)
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-4)


def killed_and_resumed(out: Path, killed: Path, *, cache: Path | None = None) -> list[dict]:
    """The jobs that copy what a run killed after its step-2 checkpoint leaves into ``killed``, and resume it there
    (the saved config is used; with ``cache``, the feature cache in that folder)."""
    checkpoint = Path("checkpoints") / "step-00000002.safetensors"
    return [{"copy": [[str(out / checkpoint), str(killed / checkpoint)],
                      [str(out / "config.yaml"), str(killed / "config.yaml")]]},
            {"main": "unet", "argv": ["--out", str(killed), "--resume", "latest",
                                      *(["--set", f"cache.dir={cache}"] if cache else [])]}]  # fmt: skip


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("ddp-data") / "shapes")


@pytest.mark.slow
@needs_gloo
def test_two_processes_train_as_one_resume_exactly_and_write_once(micro_bundle_dir, shapes, tmp_path):
    """UNet and VAE, 2 processes against 1 on the same global batch (4) and seed: the same losses at every step and
    the same weights (assert_close_weights); a 2-process UNet run killed after its step-2 checkpoint and resumed on
    2 processes ends bit-identical to the unbroken one, on the folder and on webdataset shards of it; the outputs
    are written once, by process 0. The feature cache the 2 processes build (a part each) holds the numbers 1
    process builds, and a resumed run reads the one 1 process built. (One torchrun start for all: starting one takes
    longer than a micro run.)"""
    unet = ["--bundle", str(micro_bundle_dir), "--data", str(shapes), *UNET]
    one = tmp_path / "unet-1"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes has: a convolution's rounding depends on the thread count
    try:
        assert run_cli(train_unet.main, [*unet, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    two, killed, vae_two = tmp_path / "unet-2", tmp_path / "unet-killed", tmp_path / "vae-2"
    # The shards: 3 of 3, 3 and 2 samples, which batches straddle; no feature cache and 2 dataloader workers in each
    # process, so that every image is read from its shard, by offset, in a worker.
    report = scan_dataset(DataConfig(path=str(shapes)), progress=False)
    pattern = shard_pattern(write_shards(report, tmp_path / "shards", 3, progress=False))
    on_shards = ["--bundle", str(micro_bundle_dir), "--data", pattern, *UNET, "--no-cache", "--set",
                 "train.num_workers=2"]  # fmt: skip
    shards_two, shards_killed = tmp_path / "shards-2", tmp_path / "shards-killed"
    printed = torchrun(tmp_path, [
        {"main": "unet", "argv": [*unet, "--out", str(two)]},
        *killed_and_resumed(two, killed, cache=one / "cache"),
        {"main": "vae", "argv": ["--data", str(shapes), *VAE, "--out", str(vae_two)]},
        {"main": "unet", "argv": [*on_shards, "--out", str(shards_two)]},
        *killed_and_resumed(shards_two, shards_killed),
    ])  # fmt: skip
    said = "2 processes on the CPU (no GPU here), DDP over gloo; global batch 4 = 2 × 2; process 0 writes "
    assert printed.count(said) == 5 and printed.count("bundle written to") == 5
    assert printed.count("usable pairs") == 5  # the data report, from process 0 only
    assert printed.count("feature cache: building") == 1 and "by 2 processes" in printed
    assert printed.count("feature cache: hit") == 1  # the resumed run: the cache of the 1-process run
    assert_same_caches(one / "cache", two / "cache", parts=(1, 2))

    # Killed and resumed on two processes = unbroken; each process resumed its own RNG state.
    final = "checkpoints/step-00000004.safetensors"
    assert_same_checkpoints(two / final, killed / final)
    assert_same_checkpoints(shards_two / final, shards_killed / final)
    assert any(k.startswith("s.rng_others.0.") for k in checkpoint_tensors(two / final))
    # Written once: one TensorBoard file, one bundle (which loads), the sample grid of the final validation.
    assert len(list((two / "logs").rglob("events.out.tfevents.*"))) == 1
    assert load_bundle(two / "bundle").config.unet == load_bundle(micro_bundle_dir).config.unet
    assert [p.name for p in (two / "samples").glob("*.png")] == ["samples-00000004.png"]
    assert not (two / "train.lock").exists() and not (vae_two / "train.lock").exists()  # released at the end
    assert_same_losses(one, two, "loss", range(1, 5))
    assert_close_weights(trained(one, final, "unet"), trained(two, final, "unet"), steps=4)

    vae_one = tmp_path / "vae-1"
    assert run_cli(train_vae.main, ["--data", str(shapes), *VAE, "--out", str(vae_one)]) == 0
    assert_same_losses(vae_one, vae_two, "total", range(1, 4))
    assert_same_losses(vae_one, vae_two, "d_weight", range(2, 4))  # the adaptive weight is the global batch's
    last = "checkpoints/step-00000003.safetensors"
    assert_close_weights(trained(vae_one, last, "vae"), trained(vae_two, last, "vae"), steps=3)
    scale = [load_bundle(out / "bundle").config.vae.scaling_factor for out in (vae_one, vae_two)]
    assert scale[1] == pytest.approx(scale[0], rel=1e-4)


def read_cache(folder: Path, *, parts: int):
    """The one feature cache in ``folder``, checking that it has ``parts`` part files."""
    (head,) = [p for p in folder.glob("*.safetensors") if ".part-" not in p.name]
    assert len(list(folder.glob(f"{head.stem}.part-*"))) == parts
    meta = json.loads(safe_open(str(head), framework="pt").metadata()["ldm.train.cache"])
    cache, why = load_cache(head, meta["key"])
    assert why == "hit"
    return cache


def assert_same_caches(a: Path, b: Path, *, parts: tuple[int, int]):
    """The caches in ``a`` and ``b`` hold the same numbers for every item and caption: the same VAE and text
    encoder calls, made in one process or shared between several."""
    one, two = read_cache(a, parts=parts[0]), read_cache(b, parts=parts[1])
    assert one.key == two.key and one.captions == two.captions and len(one) == len(two) > 0
    for i in range(len(one)):
        for flipped in (False, True):
            assert all(torch.equal(x, y) for x, y in zip(one.latent(i, flipped=flipped), two.latent(i, flipped=flipped)))
    assert torch.equal(one.hidden_states, two.hidden_states)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_accelerate_cpu_launch_of_several_processes_is_refused(micro_bundle_dir, shapes, tmp_path, monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2` starts one process with MASTER_ADDR and no process count."""
    for name, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert run_cli(train_unet.main, ["--bundle", str(micro_bundle_dir), "--data", str(shapes), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accelerate launch --cpu started one process although --num_processes" in err
    assert "ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node N" in err
    assert not out.exists()


def test_processes_that_accelerate_does_not_join_are_refused(micro_bundle_dir, shapes, tmp_path, monkeypatch, capsys):
    """torchrun started 2 processes, and accelerate, looking for a GPU that is not there, sets up one in each: they
    would be two trainers on one output folder. (The launcher's variables are handed to the check alone: set in the
    environment, accelerate would wait for the second process.)"""
    torchrun = launch_from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    monkeypatch.setattr("ldm.train.loop.launch_from_env", lambda: torchrun)
    monkeypatch.setattr("ldm.train.loop.has_accelerator_device", lambda: True)  # as if there were GPUs
    out = tmp_path / "run"
    assert run_cli(train_unet.main, ["--bundle", str(micro_bundle_dir), "--data", str(shapes), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the launcher started 2 processes (WORLD_SIZE=2) but accelerate set up 1" in err
    assert "each would train on its own into the same output folder; for CPU processes set ACCELERATE_USE_CPU=1" in err
    assert not out.exists()


def test_a_second_trainer_on_one_output_folder_is_refused(micro_bundle_dir, shapes, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": other.pid, "host": socket.gethostname(), "processes": 1, "started": "2026-12-01 10:00:00"}
        (out / "train.lock").write_text(json.dumps(record))
        argv = ["--bundle", str(micro_bundle_dir), "--data", str(shapes), "--out", str(out), "--max-steps", "1"]
        assert run_cli(train_unet.main, argv) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another trainer (pid {other.pid}, started 2026-12-01 10:00:00)" in err
        assert json.loads((out / "train.lock").read_text())["pid"] == other.pid  # left to its owner
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # nothing else written
    finally:
        other.kill()
        other.wait()
    # Its trainer gone (killed: the lock stays behind), the next run takes the folder over.
    lock, refusal = acquire_lock(out, processes=1)
    assert refusal is None and json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"took over {lock} from pid {other.pid}, which is gone" in capsys.readouterr().out


def test_hold_output_releases_the_lock_and_removes_a_folder_left_empty(tmp_path):
    accelerator = types.SimpleNamespace(is_main_process=True, num_processes=1)
    with pytest.raises(LdmError, match="boom"), hold_output(accelerator, tmp_path / "new"):
        assert (tmp_path / "new" / "train.lock").is_file()
        raise LdmError("boom")  # a run refused before it wrote anything
    assert not (tmp_path / "new").exists()
    with hold_output(accelerator, tmp_path / "kept"):
        (tmp_path / "kept" / "config.yaml").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.yaml"]
    other = {"pid": os.getpid(), "host": "elsewhere", "started": "then"}
    (tmp_path / "kept" / "train.lock").write_text(json.dumps(other | {"pid": 1}))
    with pytest.raises(LdmError, match=r"in use by a trainer on elsewhere \(pid 1, started then\); pass another --out"):
        with hold_output(accelerator, tmp_path / "kept"):
            pass


def test_launch_checks():
    assert launch_from_env({}) == Launch()
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert launch_from_env(torchrun) == Launch(processes=4, rank=3, local_rank=1, source="WORLD_SIZE")
    assert launch_from_env({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}).processes == 2
    with pytest.raises(LdmError, match="WORLD_SIZE='two' is not a whole number"):
        launch_from_env({"WORLD_SIZE": "two"})
    accelerate_cpu = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LdmError, match="accelerate launch --cpu started one process"):
        check_launch(launch_from_env(accelerate_cpu), accelerate_cpu)
    for fine in ({"ACCELERATE_USE_CPU": "True"}, {**accelerate_cpu, **torchrun}, {"ACCELERATE_USE_CPU": "False",
                 "MASTER_ADDR": "x"}):  # fmt: skip
        check_launch(launch_from_env(fine), fine)
    check_processes(Launch(processes=2, source="WORLD_SIZE"), processes=2, kind="MULTI_CPU")
    with pytest.raises(LdmError, match=r"started 2 processes \(WORLD_SIZE=2\) but accelerate set up 1 \(NO\)"):
        check_processes(Launch(processes=2, source="WORLD_SIZE"), processes=1, kind="NO")
    assert per_process_batch(8, 2) == 4
    with pytest.raises(LdmError, match=r"train.batch_size 10 is the global batch and must split evenly among 4 "
                                       r"processes; set --set train.batch_size=8 or 12"):  # fmt: skip
        per_process_batch(10, 4)
    with pytest.raises(LdmError, match=r"among 2 processes; set --set train.batch_size=2$"):
        per_process_batch(1, 2)


def test_the_processes_draw_the_global_batch_together():
    """Each process's rows of the global draws, side by side, are what one process draws."""

    def draws(shard, local):
        torch.manual_seed(5)
        noise = shard.local(offset_noise(shard.global_shape((local, 4, 2, 2)), strength=0.1))
        t = shard.local(sample_timesteps(shard.global_count(local), 1000))
        masks = shard.local(random_masks(shard.global_count(local), height=16, width=16, config=TaskInputConfig()))
        return noise, t, masks, torch.rand(())  # the RNG goes on in step

    whole = draws(BatchShard(), 6)
    parts = [draws(BatchShard(rank=r, processes=3), 2) for r in range(3)]
    for i in range(3):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
    assert all(torch.equal(p[3], whole[3]) for p in parts)


def test_accelerate_configs_load_and_name_real_unet_blocks(micro_bundle_dir):
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {name: load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml")).distributed_type
             for name in ("ddp-cpu", "ddp-gpu", "fsdp", "deepspeed-zero2")}  # fmt: skip
    assert {k: v.value for k, v in kinds.items()} == {"ddp-cpu": "MULTI_GPU", "ddp-gpu": "MULTI_GPU", "fsdp": "FSDP",
                                                      "deepspeed-zero2": "DEEPSPEED"}  # fmt: skip
    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    wrapped = set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","))
    classes = {type(m).__name__ for m in load_bundle(micro_bundle_dir).unet.modules()}
    assert wrapped <= classes, wrapped - classes
