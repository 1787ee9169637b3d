"""configs/runs/*.yaml load into their run configs, and recipes/emoji-tiny.sh, which passes them with --config,
trains with exactly the settings its --set chains gave before the files existed."""

import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from ldm.cli import train_clip, train_tiny_vae, train_unet, train_vae
from ldm.config import load_yaml
from ldm.train.clip import CLIPRunConfig
from ldm.train.lcm import LCMRunConfig
from ldm.train.loop import LRSchedule, Precision
from ldm.train.tiny_vae import TinyVAERunConfig
from ldm.train.unet import UNetRunConfig
from ldm.train.vae import VAERunConfig

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "configs" / "runs"
RECIPE = ROOT / "recipes" / "emoji-tiny.sh"
SHIPPED = ROOT / "models" / "emoji-tiny"
RUN_CONFIGS = {"vae": VAERunConfig, "clip": CLIPRunConfig, "unet": UNetRunConfig, "lcm": LCMRunConfig,
               "tiny_vae": TinyVAERunConfig}  # file name ends -PART.yaml  # fmt: skip
SCRIPTS = {"train_vae.py": train_vae, "train_clip.py": train_clip, "train_unet.py": train_unet}

# The three stages as recipes/emoji-tiny.sh ran them with --set chains, before configs/runs/.
OLD_COMMANDS = {
    "train_vae.py": """--preset emoji-tiny --data "$DATA/train" --eval-data "$DATA/test" --out "$OUT/vae"
        --max-steps 7400 --max-minutes 29
        --set train.batch_size=8 --set train.lr=6e-4 --set train.warmup_steps=100 --set train.lr_schedule=cosine
        --set train.mixed_precision=bf16 --set train.ema_decay=0.999
        --set train.checkpoint_every=1000 --set train.sample_every=2000""",
    "train_clip.py": """--bundle "$OUT/vae/bundle" --data "$DATA/train" --eval-data "$DATA/test" --out "$OUT/clip"
        --max-steps 1000 --max-minutes 14
        --set train.batch_size=64 --set train.lr=5e-4 --set train.warmup_steps=50 --set train.weight_decay=0.1""",
    "train_unet.py": """--bundle "$OUT/clip/bundle" --data "$BASE/train" --eval-data "$BASE/test" --out "$OUT/unet"
        --max-steps 30000 --budget-minutes 58
        --cache-dir "$OUT/cache" --set train.batch_size=32 --set train.lr=6e-4 --set train.warmup_steps=200
        --set train.weight_decay=0.01 --set train.grad_clip=1.0
        --set train.ema_decay=0.999 --set train.checkpoint_every=2000 --set train.sample_every=2000
        --set loss.min_snr_gamma=5.0 --set loss.caption_dropout=0.1 --validation-prompt "red apple"
        --validation-prompt "cat face" --validation-prompt rocket --validation-prompt pizza
        --validation-prompt "grinning face" --validation-prompt "red heart" --validation-prompt snowman
        --validation-prompt banana""",
}


def recipe_commands() -> dict[str, str]:
    """The recipe's training command lines (continuations joined): script → its arguments, as shell words."""
    commands = {}
    for line in RECIPE.read_text().replace("\\\n", " ").splitlines():
        words = line.split(maxsplit=2)
        if len(words) == 3 and words[0] == "python" and words[1] in SCRIPTS:
            commands[words[1]] = words[2]
    return commands


@pytest.fixture
def recipe_env(tmp_path, monkeypatch):
    """The recipe's variables, its folder, and the shipped bundle standing in for the stages' input bundles."""
    out = tmp_path / "out"
    for stage in ("vae", "clip"):
        (out / stage).mkdir(parents=True)
        (out / stage / "bundle").symlink_to(SHIPPED, target_is_directory=True)
    variables = {"OUT": str(out), "DATA": str(tmp_path / "emoji"), "BASE": str(tmp_path / "emoji-base")}
    monkeypatch.chdir(ROOT)
    return variables


def parse(script: str, command: str, variables: dict[str, str]):
    words = shlex.split(command)
    for name, value in variables.items():
        words = [word.replace(f"${name}", value) for word in words]
    module = SCRIPTS[script]
    return module.resolve_config(module.build_parser().parse_args(words)), words


@pytest.mark.parametrize("path", sorted(RUNS.glob("*.yaml")), ids=lambda p: p.name)
def test_each_run_file_loads_into_its_run_config(path):
    part = path.stem.rsplit("-", 1)[-1]
    assert part in RUN_CONFIGS, f"{path.name}: name it ...-vae.yaml, -clip, -unet, -lcm or -tiny_vae.yaml"
    cfg = load_yaml(RUN_CONFIGS[part], path)
    assert isinstance(cfg, RUN_CONFIGS[part]) and cfg.data.path and cfg.train.output_dir


def test_the_library_loads_a_run_file(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_yaml(UNetRunConfig, "configs/runs/emoji-tiny-unet.yaml")
    assert cfg.train.batch_size == 32 and cfg.train.budget_minutes == 58 and len(cfg.validation.prompts) == 8
    # Keys a section leaves out keep the run's own defaults, not TrainConfig's.
    assert cfg.train.lr_schedule is LRSchedule.COSINE and cfg.model is None  # the model is the bundle's
    vae = load_yaml(VAERunConfig, RUNS / "emoji-tiny-vae.yaml")
    assert vae.train.grad_clip == 0.0 and vae.train.mixed_precision is Precision.BF16 and vae.preset == "emoji-tiny"
    clip = load_yaml(CLIPRunConfig, RUNS / "emoji-tiny-clip.yaml")
    assert clip.train.adam_betas == (0.9, 0.98) and clip.train.sample_every == 500


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped model in this checkout")
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_recipe_trains_with_the_settings_of_its_old_set_chains(script, recipe_env):
    new_command = recipe_commands()[script]
    new, words = parse(script, new_command, recipe_env)
    old, _ = parse(script, OLD_COMMANDS[script], recipe_env)
    assert "--config" in words and "--set" not in words  # the settings come from the file
    assert new == old


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped model in this checkout")
def test_flags_and_set_override_the_config_file(recipe_env, tmp_path):
    argv = ["--config", str(RUNS / "emoji-tiny-unet.yaml"), "--bundle", f"{recipe_env['OUT']}/clip/bundle",
            "--data", "elsewhere", "--out", str(tmp_path / "run"), "--max-steps", "5", "--name", "mine",
            "--set", "train.lr=1e-3", "--set", "validation.num_prompts=2", "--validation-prompt", "owl"]  # fmt: skip
    cfg = train_unet.resolve_config(train_unet.build_parser().parse_args(argv))
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.output_dir) == (1e-3, 5, str(tmp_path / "run"))
    assert (cfg.data.path, cfg.name, cfg.validation.prompts) == ("elsewhere", "mine", ("owl",))
    assert cfg.validation.num_prompts == 2
    assert cfg.train.batch_size == 32 and cfg.loss.caption_dropout == 0.1  # the rest is the file's
    assert cfg.model is not None and cfg.bundle.endswith("clip/bundle")  # the model comes from the bundle

    argv = ["--config", str(RUNS / "emoji-tiny-vae.yaml"), "--out", str(tmp_path / "vae"),
            "--set", "train.batch_size=2", "--resolution", "32", "--set", "loss.kl_weight=1e-5"]  # fmt: skip
    cfg = train_vae.resolve_config(train_vae.build_parser().parse_args(argv))
    assert (cfg.train.batch_size, cfg.train.lr, cfg.data.resolution, cfg.loss.kl_weight) == (2, 6e-4, 32, 1e-5)
    assert cfg.model is not None and cfg.model.vae.latent_channels == 16  # the preset's

    argv = ["--config", str(RUNS / "emoji-tiny-clip.yaml"), "--preset", "emoji-tiny", "--eval-data", "held",
            "--set", "model.vision.layers=1"]  # fmt: skip
    cfg = train_clip.resolve_config(train_clip.build_parser().parse_args(argv))
    assert (cfg.preset, cfg.bundle, cfg.eval_data, cfg.model.vision.layers) == ("emoji-tiny", "", "held", 1)


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped model in this checkout")
def test_the_recipe_distils_the_tiny_autoencoder_from_its_run_file(recipe_env, tmp_path):
    lines = RECIPE.read_text().replace("\\\n", " ").splitlines()
    (command,) = [line.split(maxsplit=2)[2] for line in lines if line.startswith("python train_tiny_vae.py ")]
    words = [w.replace("$SHIP", str(SHIPPED)) for w in shlex.split(command)]
    for name, value in recipe_env.items():
        words = [word.replace(f"${name}", value) for word in words]
    assert "--config" in words and "--set" not in words
    cfg = train_tiny_vae.resolve_config(train_tiny_vae.build_parser().parse_args(words))
    assert cfg.bundle == str(SHIPPED) and cfg.preset == "emoji-tiny" and cfg.model.latent_channels == 16
    assert cfg.train.budget_minutes == 40 and cfg.data.path == f"{recipe_env['BASE']}/train"


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped model in this checkout")
def test_the_judging_clip_is_emoji_tinys_clip_recipe_with_another_seed(recipe_env, tmp_path):
    """recipes/emoji-lcm-clip.sh trains the CLIP that scores the LCM-LoRA as stage 3 of emoji-tiny.sh trains
    emoji-tiny's, but from another seed (so its text tower is not the generator's text encoder) and to its last
    step whatever the clock."""
    text = (ROOT / "recipes" / "emoji-lcm-clip.sh").read_text().replace("\\\n", " ")
    text = text.replace('"$(dirname "$CLIP")"', str(tmp_path / "judge"))
    lines = [line.strip() for line in text.splitlines()]
    (command,) = [line.split(maxsplit=2)[2] for line in lines if line.startswith("python train_clip.py ")]
    judge, _ = parse("train_clip.py", command, recipe_env)
    shipped, _ = parse("train_clip.py", recipe_commands()["train_clip.py"], recipe_env)
    assert judge.bundle == "models/emoji-tiny" and judge.model == shipped.model
    assert (judge.train.seed, judge.train.max_minutes, judge.train.max_steps) == (1, 0, 1000)
    assert (shipped.train.seed, shipped.train.max_minutes) == (0, 14)
    same = replace(judge.train, seed=shipped.train.seed, max_minutes=shipped.train.max_minutes,
                   output_dir=shipped.train.output_dir)  # fmt: skip
    assert same == shipped.train and judge.data == shipped.data and judge.eval_data == shipped.eval_data
