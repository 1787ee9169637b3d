"""DreamBooth with train_unet.py on the micro bundle: the prior-preservation loss, the batches, the class images the
base generates, exact resume, what prior preservation keeps, LoRA, and bad input."""

import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_unet import checkpoint_tensors

from ldm.cli import train_unet
from ldm.cli.common import run_cli
from ldm.data import DataConfig
from ldm.formats.bundle import load_bundle
from ldm.formats.pngmeta import ImageParameters, read_png_parameters
from ldm.pipeline import Request, encode_prompts, generate, to_uint8
from ldm.pipeline.schedule import get_sampler
from ldm.train.dreambooth import DreamBoothConfig, PriorBatches, fill_class_folder
from ldm.train.objectives import add_noise, alphas_cumprod, prior_preservation_loss

INSTANCE, CLASS = "a photo of sks dog", "a photo of a dog"
SIDE, CLASS_IMAGES = 32, 3


def test_prior_preservation_loss_is_its_formula():
    """Ruiz et al. 2023, Eq. 2: mean weighted MSE of the instance samples + λ × that of the class samples."""
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25, 4.0])
    prior = torch.tensor([False, True, False, True, True])
    mse = [((prediction[i] - target[i]) ** 2).mean().item() * weights[i].item() for i in range(5)]
    instance, classes = (mse[0] + mse[2]) / 2, (mse[1] + mse[3] + mse[4]) / 3
    loss, got_instance, got_prior = prior_preservation_loss(prediction, target, weights, prior=prior, prior_weight=0.3)
    assert got_instance.item() == pytest.approx(instance, rel=1e-6)
    assert got_prior.item() == pytest.approx(classes, rel=1e-6)
    assert loss.item() == pytest.approx(instance + 0.3 * classes, rel=1e-6)
    # Not the plain mean over the batch (which weighs each term by its share of the samples).
    assert loss.item() != pytest.approx(sum(mse[:2]) + 0.3 * sum(mse[2:]), rel=1e-3)
    unweighted, _, _ = prior_preservation_loss(prediction, target, None, prior=prior, prior_weight=0.0)
    assert unweighted.item() == pytest.approx(((prediction - target)[[0, 2]] ** 2).mean().item(), rel=1e-6)


def test_prior_batches_hold_instance_then_class_items():
    order = PriorBatches(4, 5, 2, seed=3)  # 4 instance items (0-3), 5 class items (4-8), batches of 2 + 2
    epochs = [order.epoch(e) for e in range(3)]
    assert len(order) == 2 and all(len(batches) == 2 for batches in epochs)
    for batch in (b for batches in epochs for b in batches):
        assert all(i < 4 for i in batch[:2]) and all(4 <= i < 9 for i in batch[2:]) and len(batch) == 4
    stream = [i for batches in epochs for b in batches for i in b[2:]]  # 12 class places: 5, 5 and 2 of a third pass
    assert sorted(stream[:5]) == sorted(stream[5:10]) == list(range(4, 9)) and stream[:5] != stream[5:10]
    assert {i for b in epochs[0] for i in b[:2]} == {0, 1, 2, 3}  # an epoch is one pass over the subject's images
    # A pure function of the seed and the position: what a resumed run draws.
    assert PriorBatches(4, 5, 2, seed=3).epoch(1, start=1) == epochs[1][1:]
    assert PriorBatches(4, 5, 2, seed=4).epoch(0) != epochs[0]
    # Two processes: each its own slice of the global batch, the class places continuing across them.
    ranks = [PriorBatches(4, 5, 2, seed=3, num_replicas=2, rank=r).epoch(0) for r in range(2)]
    places = [i for b in range(2) for r in range(2) for i in ranks[r][b][1:]]
    assert sorted(i for r in ranks for b in r for i in b[:1]) == [0, 1, 2, 3] and len(set(places)) == 4


def subject_pictures(root):
    """Three reddish squares on white: the subject."""
    root.mkdir(parents=True)
    for i in range(3):
        image = np.full((40, 40, 3), 255, np.uint8)
        image[6 + i : 30 + i, 8:32] = (220, 40 + 30 * i, 30)
        Image.fromarray(image).save(root / f"dog{i}.png")
    return root


def class_request(seeds, prompt=CLASS):
    """What the class images are drawn with: the dreambooth section's defaults but 2 steps."""
    return Request(prompts=[prompt] * len(seeds), negative_prompts=[""] * len(seeds), seeds=list(seeds), steps=2,
                   guidance_scale=7.5, sampler=get_sampler("dpmpp_2m"), width=SIDE, height=SIDE)  # fmt: skip


def test_missing_class_images_are_generated_and_existing_ones_kept(micro_bundle_dir, tmp_path):
    folder = tmp_path / "dogs"
    folder.mkdir()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(folder / "00002-7.png")  # the user's, numbered
    Image.new("RGB", (48, 40), (30, 20, 10)).save(folder / "mine.jpg")
    (folder / "notes.txt").write_text("not an image")
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    data = DataConfig(path=str(tmp_path / "dog"), resolution=SIDE)
    db = DreamBoothConfig(class_data=str(folder), class_prompt=CLASS, num_class_images=5, steps=2)
    base = load_bundle(micro_bundle_dir)
    assert fill_class_folder(db, data, base) == 3  # 2 of 5 there
    made = sorted(set(p.name for p in folder.iterdir()) - set(kept))
    assert made == ["00003-3.png", "00004-4.png", "00005-5.png"]  # numbered after the highest, seed = number
    assert {name: (folder / name).read_bytes() for name in kept} == kept  # nothing overwritten
    record = ImageParameters.from_text(read_png_parameters(folder / made[1]))
    assert (record.prompt, record.seed, record.steps, record.width, record.model) == (CLASS, 4, 2, SIDE, "micro")
    assert record.model_hash == base.model_hash and record.sampler == "DPM++ 2M"
    # Drawn by generate itself, in one batch as here.
    expected = to_uint8(generate(base, class_request([3, 4, 5]), progress=False))[1].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(folder / made[1])), expected)
    assert fill_class_folder(db, data, base) == 0 and len(list(folder.iterdir())) == len(kept) + 3  # enough now


def dreambooth_args(bundle, instance, classes, out, *extra):
    return ["--bundle", str(bundle), "--instance-data", str(instance), "--instance-prompt", INSTANCE,
            "--class-data", str(classes), "--class-prompt", CLASS, "--num-class-images", str(CLASS_IMAGES),
            "--resolution", str(SIDE), "--out", str(out), "--set", "dreambooth.steps=2", "--set", "validation.steps=2",
            "--set", "train.lr=1e-3", "--set", "train.log_every=1", *extra]  # fmt: skip


STEPS, KILLED_AT = 4, 2


@pytest.fixture(scope="module")
def dreambooth_run(micro_bundle_dir, tmp_path_factory):
    """A full fine-tune with prior preservation, its class images generated by the run: (run folder, instance
    folder, class folder)."""
    root = tmp_path_factory.mktemp("dreambooth")
    instance, classes, out = subject_pictures(root / "dog"), root / "dogs", root / "straight"
    argv = dreambooth_args(micro_bundle_dir, instance, classes, out, "--max-steps", str(STEPS),
                           "--set", f"train.checkpoint_every={KILLED_AT}")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    return out, instance, classes


def test_dreambooth_resumes_exactly(dreambooth_run, tmp_path, capsys):
    """Killed after its step-2 checkpoint and resumed from the config it saved, the run ends as the straight one:
    the same batches of instance and class images (the class images are there now, and not made again)."""
    straight, _, classes = dreambooth_run
    assert len(list(classes.glob("*.png"))) == CLASS_IMAGES
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / f"step-{KILLED_AT:08d}.safetensors", killed / "checkpoints")
    shutil.copy(straight / "config.yaml", killed)
    capsys.readouterr()
    assert run_cli(train_unet.main, ["--out", str(killed), "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "generating" not in printed and "3 instance images ('a photo of sks dog'), 3 class images" in printed
    a = checkpoint_tensors(straight / "checkpoints" / f"step-{STEPS:08d}.safetensors")
    b = checkpoint_tensors(killed / "checkpoints" / f"step-{STEPS:08d}.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("s.optimizers.unet.state.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = checkpoint_tensors(straight / "checkpoints" / f"step-{KILLED_AT:08d}.safetensors")
    assert any(not torch.equal(first[k], a[k]) for k in a if k.startswith("s.models."))  # the weights moved


@torch.no_grad()
def class_loss(bundle, classes) -> float:
    """The denoising loss (ε MSE) of the class images with the class prompt, at fixed noise and timesteps."""
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(classes.glob("*.png"))])
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W) in [-1, 1]
    x0 = bundle.vae.encode(pixels).latent_dist.mean.repeat(8, 1, 1, 1) * bundle.config.vae.scaling_factor
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (len(x0),), generator=g)
    context = encode_prompts(bundle, [CLASS] * len(x0), dtype=torch.float32)
    prediction = bundle.unet(add_noise(x0, noise, t, alphas_cumprod(bundle.config.schedule)), t,
                             encoder_hidden_states=context).sample  # fmt: skip
    return (prediction - noise).pow(2).mean().item()


def test_the_class_images_train_with_their_weight(dreambooth_run, micro_bundle_dir, tmp_path):
    """The subject's prompt draws other images after training than before; the class images (made by the base from
    the class prompt) are learned with prior preservation, and not when the same run has --prior-loss-weight 0."""
    with_prior, instance, classes = dreambooth_run
    argv = dreambooth_args(micro_bundle_dir, instance, classes, tmp_path / "no-prior", "--max-steps", str(STEPS),
                           "--prior-loss-weight", "0")  # fmt: skip
    assert run_cli(train_unet.main, argv) == 0
    base, trained, seeds = load_bundle(micro_bundle_dir), load_bundle(with_prior / "bundle"), range(CLASS_IMAGES)
    before = generate(base, class_request(seeds, INSTANCE), progress=False)
    assert (generate(trained, class_request(seeds, INSTANCE), progress=False) - before).abs().mean() > 1e-3
    learned, ignored = class_loss(trained, classes), class_loss(load_bundle(tmp_path / "no-prior" / "bundle"), classes)
    assert learned < 0.97 * ignored, (learned, ignored)


def test_lora_dreambooth_writes_the_lora(micro_bundle_dir, dreambooth_run, tmp_path):
    pytest.importorskip("peft", reason="LoRA needs the optional package peft: pip install -e '.[test,lora]'")
    _, instance, classes = dreambooth_run
    out = tmp_path / "lora"
    assert run_cli(train_unet.main, dreambooth_args(micro_bundle_dir, instance, classes, out, "--max-steps", "1",
                                                    "--lora-rank", "2")) == 0  # fmt: skip
    assert (out / "lora.safetensors").is_file() and not (out / "bundle").exists()


DB = ["--instance-data", "DOG", "--instance-prompt", INSTANCE]
PRIOR = [*DB, "--class-data", "d", "--class-prompt", CLASS]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--instance-data", "missing", "--instance-prompt", INSTANCE], "--instance-data missing not found; pass the"),
        (["--instance-data", "EMPTY", "--instance-prompt", INSTANCE], "--instance-data .*empty holds no pictures"),
        (["--instance-data", "DOG"], "--instance-data needs --instance-prompt"),
        (["--data", "DOG", "--instance-prompt", INSTANCE], "--instance-prompt captions the pictures of"),
        (["--data", "DOG", *DB], "pass it or --data, not both"),
        ([*DB, "--class-prompt", CLASS], "--class-prompt needs --class-data DIR"),
        ([*DB, "--class-data", "d"], "--class-data needs --class-prompt"),
        ([*PRIOR, "--prior-loss-weight", "-1"], "--prior-loss-weight must be a number ≥ 0 .* --prior-loss-weight 1.0"),
        (["--data", "DOG", "--prior-loss-weight", "2"], "pass --class-data and --class-prompt with them"),
        ([*DB, "--class-data", "DOG/sub", "--class-prompt", CLASS], "share a folder, and every image below a folder"),
        ([*PRIOR, "--bucketing"], "prior preservation batches instance and class images at one size; leave out"),
        (["--data", "DOG", "--set", "dreambooth.class_data=d"], "dreambooth.class_data needs dreambooth.class_prompt"),
        (["--data", "DOG", "--set", "dreambooth.prior_loss_weight=-2"], "prior_loss_weight must be a finite number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(extra, message, micro_bundle_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dog = subject_pictures(tmp_path / "dog")
    (tmp_path / "empty").mkdir()
    where = {"DOG": str(dog), "EMPTY": str(tmp_path / "empty"), "DOG/sub": str(dog / "sub")}
    argv = ["--bundle", str(micro_bundle_dir), "--out", "o", *(where.get(a, a) for a in extra)]
    assert run_cli(train_unet.main, argv) == 2
    lines = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.strip()]
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, lines
    assert re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_run_config_with_a_class_takes_the_class_flags(micro_bundle_dir, tmp_path):
    """The class flags fill the run config's dreambooth section: a --config file that names the class data takes
    --prior-loss-weight alone, and the instance flags make the data the images layout with the prompt."""
    config = tmp_path / "run.yaml"
    config.write_text(f"bundle: {micro_bundle_dir}\ndata: {{path: x}}\n"
                      f"dreambooth: {{class_data: {tmp_path / 'dogs'}, class_prompt: {CLASS}}}\n")  # fmt: skip
    dog = subject_pictures(tmp_path / "dog")
    argv = ["--config", str(config), *DB, "--prior-loss-weight", "0.5", "--out", str(tmp_path / "o")]
    cfg = train_unet.resolve_config(train_unet.build_parser().parse_args([str(dog) if a == "DOG" else a for a in argv]))
    assert (cfg.dreambooth.class_prompt, cfg.dreambooth.prior_loss_weight) == (CLASS, 0.5)
    assert (cfg.data.path, cfg.data.layout.value, cfg.data.caption) == (str(dog), "images", INSTANCE)
