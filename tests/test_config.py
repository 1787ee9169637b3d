import dataclasses
from pathlib import Path

import pytest

from ldm.config import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from ldm.errors import ConfigError
from ldm.models.presets import PRESETS, ModelConfig, get_preset
from ldm.pipeline.schedule import BetaSchedule, Prediction
from ldm.train.loop import Precision, TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_yaml(name, tmp_path):
    preset = PRESETS[name]
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(preset))
    assert load_yaml(ModelConfig, path) == preset
    assert from_dict(ModelConfig, to_dict(preset)) == preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_configs_folder_matches_registry(name):
    assert load_yaml(ModelConfig, CONFIGS / f"{name}.yaml") == PRESETS[name]


def test_unknown_key_names_key_and_valid_keys():
    data = to_dict(PRESETS["micro"])
    data["unet"]["layers_per_blok"] = 3
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data)
    message = str(err.value)
    assert "'unet.layers_per_blok'" in message
    assert "did you mean 'layers_per_block'" in message
    assert "cross_attention_dim" in message  # lists the valid keys


def test_unknown_top_level_key():
    data = to_dict(PRESETS["micro"]) | {"sampler": "ddim"}
    with pytest.raises(ConfigError, match="unknown config key 'sampler'.*valid keys here: classes, conditioning, schedule, task, text_encoder, unet, upscale_factor, vae"):
        from_dict(ModelConfig, data)


@pytest.mark.parametrize(
    "override, message",
    [
        ("unet.layers_per_block=two", "'unet.layers_per_block' must be an integer, got 'two'"),
        ("unet.layers_per_block=1.5", "must be an integer"),
        ("schedule.prediction=x0", "must be one of 'epsilon', 'v_prediction'"),
        ("unet.use_linear_projection=1", "must be true or false"),
        ("vae.block_out_channels=32", "must be a list"),
        ("unet.nope=1", "unknown config key 'unet.nope'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("unet.layers_per_block", "must look like key.path=value"),
    ],
)
def test_overrides_are_type_checked(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(PRESETS["micro"], [override])


def test_overrides_apply_and_convert():
    cfg = apply_overrides(
        PRESETS["micro"],
        ["unet.layers_per_block=2", "schedule.beta_schedule=linear", "schedule.beta_end=2e-2", "vae.block_out_channels=[4,4,8,8]"],
    )
    assert cfg.unet.layers_per_block == 2
    assert cfg.schedule.beta_schedule is BetaSchedule.LINEAR
    assert cfg.schedule.beta_end == 0.02
    assert cfg.vae.block_out_channels == (4, 4, 8, 8)
    assert cfg.schedule.prediction is Prediction.EPSILON


def test_enum_value_that_yaml_reads_as_a_bool(tmp_path):
    # YAML 1.1 reads an unquoted `no` as false: `--set train.mixed_precision=no` must still mean Precision.NO.
    assert apply_overrides(TrainConfig(), ["mixed_precision=no"]).mixed_precision is Precision.NO
    path = tmp_path / "train.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_yaml(TrainConfig, path).mixed_precision is Precision.NO
    with pytest.raises(ConfigError, match="'mixed_precision' must be one of 'no', 'bf16', 'fp16', got True"):
        apply_overrides(TrainConfig(), ["mixed_precision=yes"])  # no member reads as true


def test_cross_part_consistency_is_checked():
    with pytest.raises(ConfigError, match="cross_attention_dim .* must equal text_encoder.width"):
        apply_overrides(PRESETS["micro"], ["text_encoder.width=64", "text_encoder.heads=2"])


def test_invalid_values_are_config_errors():
    with pytest.raises(ConfigError, match="block_out_channels needs at least one level"):
        apply_overrides(PRESETS["micro"], ["vae.block_out_channels=[]"])
    with pytest.raises(ConfigError, match="vae: layers_per_block must be at least 1, got 0"):
        apply_overrides(PRESETS["micro"], ["vae.layers_per_block=0"])
    with pytest.raises(ConfigError, match="scaling_factor must be a positive number"):
        apply_overrides(PRESETS["micro"], ["vae.scaling_factor=0"])
    assert apply_overrides(PRESETS["micro"], ["vae.block_out_channels=[8,8,16]"]).vae.downsampling_factor == 4


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(ModelConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(ModelConfig, tmp_path / "missing.yaml")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'sd-v3'; choose one of: micro, emoji-tiny, sd-v1, sd-v2"):
        get_preset("sd-v3")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["micro"].unet.layers_per_block = 5


BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["vae: *i"]
)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """Nine levels of nine aliases would be 9⁹ strings: refused at the first alias, in a file and in --set."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match=r"YAML alias \*a at line 2: aliases are not allowed in configs") as info:
        load_yaml(ModelConfig, path)
    assert len(str(info.value)) < 200
    with pytest.raises(ConfigError, match="aliases are not allowed"):
        apply_overrides(PRESETS["micro"], ["unet.block_out_channels=[&x 8, *x, *x, *x]"])


def test_oversized_and_binary_config_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("vae: {}\n" + "#" * (1 << 20))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_yaml(ModelConfig, big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_yaml(ModelConfig, binary)
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(ModelConfig, tmp_path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=.nan", "'lr' must be a finite number, got nan"),
        ("lr=.inf", "'lr' must be a finite number, got inf"),
        ("lr=-.inf", "'lr' must be a finite number, got -inf"),
        ("lr=1e400", "'lr' must be a finite number"),  # YAML reads it as a string, float() as inf
        (f"lr={10**400}", "'lr' must be a finite number"),  # an integer too big for any float
        (f"seed={2**70}", "'seed' must be an integer of at most 63 bits, got 1180591620717411303424"),
        ("seed=" + "9" * 500, r"got 9{79}…$"),  # the value quoted back is cut to one line
    ],
)
def test_numbers_out_of_any_sensible_range(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=-1", "train.lr must be a positive number, got -1.0"),
        ("lr=0", "train.lr must be a positive number"),
        ("adam_betas=[2, 3]", r"train.adam_betas must both be in \[0, 1\), got \[2.0, 3.0\]"),
        ("weight_decay=-0.1", "train.weight_decay must be at least 0"),
        ("seed=-1", "train.seed must be at least 0"),
    ],
)
def test_optimizer_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


RUN_TRAIN = TrainConfig(lr=5e-4, grad_clip=0.0, max_steps=7)  # a run's own training defaults


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Run:
    train: TrainConfig = RUN_TRAIN


def test_a_partial_section_keeps_the_values_of_its_fields_default():
    cfg = from_dict(_Run, {"train": {"batch_size": 8, "max_steps": 9}})
    assert (cfg.train.batch_size, cfg.train.max_steps) == (8, 9)  # given
    assert (cfg.train.lr, cfg.train.grad_clip) == (5e-4, 0.0)  # the run's defaults, not TrainConfig's 1e-4 and 1.0
    assert from_dict(_Run, {}).train == RUN_TRAIN
    assert from_dict(_Run, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        from_dict(_Run, {"train": {"batch_sise": 8}})
