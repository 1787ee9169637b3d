import math
import random
import types

import numpy as np
import pytest
import torch

from ldm.errors import LdmError
from ldm.train.loop import (
    EpochBatches,
    LRSchedule,
    Progress,
    TrainConfig,
    TrainingState,
    _flatten,
    _unflatten,
    image_grid,
    list_checkpoints,
    load_checkpoint,
    make_accelerator,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
    save_checkpoint,
    train_loop,
)


def test_optimizer_is_fused_on_cpu_and_matches_the_loop():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(3)]
    grads = [torch.randn_like(w) for w in weights]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused_params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": iter(fused_params[:1])}, {"params": fused_params[1:], "weight_decay": 0.0}]
    fused = make_optimizer(groups, cfg)  # param groups as train_unet passes them; a generator is not spent
    assert fused.defaults["fused"] is True
    assert [len(g["params"]) for g in fused.param_groups] == [1, 1]
    loop_params = [torch.nn.Parameter(w.clone()) for w in weights]
    loop = torch.optim.AdamW(
        [{"params": loop_params[:1]}, {"params": loop_params[1:], "weight_decay": 0.0}],
        lr=1e-2, weight_decay=0.1, foreach=False,
    )  # fmt: skip
    for _ in range(3):
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fused_params[0], weights[0])  # it moved


def test_flatten_round_trip_keeps_types_and_values():
    tensors = {}
    obj = {
        "a": torch.arange(3.0),
        "b": (1, 2.5, "x", None, True),
        5: [np.arange(4, dtype=np.uint32), {"nested": torch.ones(2, dtype=torch.bfloat16)}],
    }
    skeleton = _flatten(obj, "s", tensors)
    import json

    back = _unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"] and isinstance(back["b"], tuple)
    assert np.array_equal(back[5][0], obj[5][0]) and back[5][0].dtype == np.uint32
    assert back[5][1]["nested"].dtype == torch.bfloat16


def test_epoch_batches_are_deterministic_and_disjoint_across_processes():
    order = EpochBatches(10, 2, seed=3)
    assert order.epoch(0) == EpochBatches(10, 2, seed=3).epoch(0)
    assert order.epoch(0) != order.epoch(1)
    assert order.epoch(0, start=2) == order.epoch(0)[2:]
    # train.batch_size is the global batch: two processes take halves of the one process's batches
    whole = EpochBatches(10, 4, seed=3).epoch(0)
    shards = [EpochBatches(10, 4, seed=3, num_replicas=2, rank=r).epoch(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 2
    assert [a + b for a, b in zip(*shards)] == whole
    seen = [i for shard in shards for batch in shard for i in batch]
    assert len(seen) == len(set(seen)) == 8
    with pytest.raises(LdmError, match="fewer than one batch"):
        EpochBatches(3, 4, seed=0)
    with pytest.raises(LdmError, match=r"train.batch_size 6 is the global batch and must split evenly among 4 "
                                       r"processes; set --set train.batch_size=4 or 8"):  # fmt: skip
        EpochBatches(10, 6, seed=0, num_replicas=4)


@pytest.mark.parametrize(
    "schedule, decay",
    [(LRSchedule.COSINE, lambda p: 0.5 * (1 + math.cos(math.pi * p))), (LRSchedule.LINEAR, lambda p: 1.0 - p)],
)
def test_decaying_schedules_warm_up_then_reach_zero_at_max_steps(schedule, decay):
    cfg = TrainConfig(lr=1.0, warmup_steps=2, max_steps=12, lr_schedule=schedule)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_lr_scheduler(opt, cfg, processes=1)
    lrs = []
    for _ in range(13):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]  # linear warm-up
    assert lrs[2:] == pytest.approx([decay(k / 10) for k in range(11)], abs=1e-12)  # steps 2..12: progress 0 → 1


def test_decays_follow_the_budget_clock_and_a_constant_schedule_does_not():
    cases = ((0.25, 0.5 * (1 + math.cos(math.pi * 0.25)), 0.75), (0.5, 0.5, 0.5),
             (0.9, 0.5 * (1 + math.cos(math.pi * 0.9)), 0.1), (1.5, 0.0, 0.0))  # fmt: skip
    for schedule in LRSchedule:
        cfg = TrainConfig(lr=1.0, warmup_steps=1, max_steps=1000, lr_schedule=schedule, budget_minutes=1)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = make_lr_scheduler(opt, cfg, processes=1)
        for spent, cosine, linear in cases:  # steps 1-4: warm-up over, the clock far ahead of the steps
            sched.budget_clock.spent = spent
            opt.step()
            sched.step()
            expected = {LRSchedule.COSINE: cosine, LRSchedule.LINEAR: linear, LRSchedule.CONSTANT: 1.0}[schedule]
            assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_schedule_counts_optimizer_steps_when_accelerate_steps_it_once_per_process():
    cfg = TrainConfig(lr=1.0, warmup_steps=3, max_steps=10, lr_schedule=LRSchedule.COSINE)
    curves = []
    for processes in (1, 2):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        sched = make_lr_scheduler(opt, cfg, processes=processes)
        curve = []
        for _ in range(10):
            curve.append(opt.param_groups[0]["lr"])
            opt.step()
            for _ in range(processes):  # what AcceleratedScheduler.step does without split_batches
                sched.step()
        curves.append(curve)
    assert curves[0] == curves[1] and curves[0][:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and curves[0][-1] < 0.05


def _timed_run(tmp_path, monkeypatch, *, budget, resume=None):
    """train_loop on a 1-parameter model with a fake clock that advances 10 s per reading; the LR of each step."""
    readings = iter(range(0, 10_000, 10))
    monkeypatch.setattr("ldm.train.loop.time", types.SimpleNamespace(monotonic=lambda: float(next(readings))))
    cfg = TrainConfig(output_dir=str(tmp_path), lr=1.0, batch_size=1, max_steps=10**6, lr_schedule=LRSchedule.COSINE,
                      budget_minutes=budget, checkpoint_every=10**6)  # fmt: skip
    accelerator = make_accelerator(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    opt, sched = accelerator.prepare(opt, make_lr_scheduler(opt, cfg, processes=1))  # wrapped, as the training scripts have them
    state = TrainingState(models={"m": torch.nn.ParameterList([param])}, optimizers={"o": opt}, schedulers={"s": sched})
    if resume is not None:
        load_checkpoint(resume, accelerator, state, config=cfg)
    lrs = []

    def step_fn(batch, step):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        return {}

    progress = train_loop(accelerator=accelerator, cfg=cfg, state=state, dataset=[{"x": torch.zeros(1)}] * 4,
                          step_fn=step_fn, config=cfg)  # fmt: skip
    return progress, lrs


def test_budget_stops_training_and_anneals_within_it_across_a_resume(tmp_path, monkeypatch):
    progress, lrs = _timed_run(tmp_path, monkeypatch, budget=1.0)  # one minute: six steps of 10 s
    assert (progress.step, progress.seconds) == (6, 60.0)
    # Each step's LR was set at the end of the step before, from the clock read after the step before that.
    spent = [0, 0, 10, 20, 30, 40]
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 60)) for s in spent])
    # Spent: resuming with the same budget does nothing; a doubled budget continues the schedule from halfway.
    latest = list_checkpoints(tmp_path)[-1]
    assert _timed_run(tmp_path, monkeypatch, budget=1.0, resume=latest)[0].step == 6
    progress, lrs = _timed_run(tmp_path, monkeypatch, budget=2.0, resume=latest)
    assert (progress.step, progress.seconds) == (12, 120.0)
    assert lrs[1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 60 / 120)))


def test_samples_every_sample_every_steps_but_not_at_the_last_step(tmp_path):
    """The caller validates the final weights once after the loop; the loop does not do it too."""
    cfg = TrainConfig(output_dir=str(tmp_path), batch_size=1, max_steps=6, sample_every=2, checkpoint_every=10**6)
    accelerator = make_accelerator(cfg)
    param = torch.nn.Parameter(torch.zeros(1))
    state = TrainingState(models={"m": torch.nn.ParameterList([param])}, optimizers={})
    sampled = []
    progress = train_loop(accelerator=accelerator, cfg=cfg, state=state, dataset=[{"x": torch.zeros(1)}] * 4,
                          step_fn=lambda batch, step: {}, config=cfg, sample_fn=sampled.append)  # fmt: skip
    assert progress.step == 6 and sampled == [2, 4]


def test_checkpoint_restores_everything(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), keep_checkpoints=2)
    accelerator = make_accelerator(cfg)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = TrainingState(models={"m": model}, optimizers={"o": opt}, progress=Progress(step=7, epoch=1, batch_in_epoch=3))
    random.seed(1)
    torch.manual_seed(1)
    path = save_checkpoint(accelerator, state, tmp_path, config=cfg, keep=2)
    expected_draw = (random.random(), torch.rand(1), np.random.rand())

    fresh_model = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=0.1)
    fresh = TrainingState(models={"m": fresh_model}, optimizers={"o": fresh_opt})
    load_checkpoint(path, accelerator, fresh, config=cfg)
    assert (random.random(), torch.rand(1), np.random.rand()) == expected_draw  # RNG streams continue
    assert vars(fresh.progress) == {"step": 7, "epoch": 1, "batch_in_epoch": 3, "seconds": 0.0}
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name in sa["state"][k]:
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])


def test_ema_update_matches_diffusers_ema_model():
    # make_ema's one-pass update against diffusers' EMAModel: same shadow weights (to rounding), same decay warm-up,
    # frozen parameters copied rather than averaged.
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[1].bias.requires_grad_(False)
    cfg = TrainConfig(ema_decay=0.99)
    ours = make_ema(model, cfg)
    reference = EMAModel(model.parameters(), decay=0.99, foreach=True)
    assert type(ours) is not EMAModel
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.step(model.parameters())
        reference.step(model.parameters())
        assert ours.cur_decay_value == reference.cur_decay_value < 0.99  # still warming up
    assert ours.optimization_step == 6
    for s, r, p in zip(ours.shadow_params, reference.shadow_params, model.parameters()):
        torch.testing.assert_close(s, r, rtol=1e-6, atol=1e-6)
        assert torch.equal(s, p) == (not p.requires_grad)


def test_resumed_ema_matches_and_sits_on_the_accelerator_device(tmp_path):
    # A checkpoint's tensors load on the CPU; on a GPU run the EMA step then mixed devices. The "meta" device
    # stands in for the GPU: the restored shadow weights must move to wherever the accelerator trains.
    cfg = TrainConfig(output_dir=str(tmp_path), ema_decay=0.9)
    accelerator = make_accelerator(cfg)
    model = torch.nn.Linear(3, 2)
    ema = make_ema(model, cfg)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model.parameters())
    state = TrainingState(models={"m": model}, optimizers={}, emas={"m": ema})
    path = save_checkpoint(accelerator, state, tmp_path, config=cfg, keep=1)

    fresh_model = torch.nn.Linear(3, 2)
    fresh = TrainingState(models={"m": fresh_model}, optimizers={}, emas={"m": make_ema(fresh_model, cfg)})
    load_checkpoint(path, accelerator, fresh, config=cfg)
    for a, b in zip(ema.shadow_params, fresh.emas["m"].shadow_params):
        assert torch.equal(a, b)
    assert fresh.emas["m"].optimization_step == ema.optimization_step == 1

    elsewhere = types.SimpleNamespace(device=torch.device("meta"), unwrap_model=lambda m: m, num_processes=1,
                                      process_index=0, is_main_process=True)  # fmt: skip
    other = torch.nn.Linear(3, 2)
    fresh = TrainingState(models={"m": other}, optimizers={}, emas={"m": make_ema(other, cfg)})
    load_checkpoint(path, elsewhere, fresh, config=cfg)
    assert {p.device.type for p in fresh.emas["m"].shadow_params} == {"meta"}


def test_checkpoints_are_pruned_and_resolved(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path))
    accelerator = make_accelerator(cfg)
    model = torch.nn.Linear(1, 1)
    state = TrainingState(models={"m": model}, optimizers={"o": torch.optim.SGD(model.parameters(), lr=1)})
    for step in (1, 2, 3):
        state.progress.step = step
        save_checkpoint(accelerator, state, tmp_path, config=cfg, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.safetensors", "step-00000003.safetensors"]
    assert resolve_resume("latest", tmp_path).name == "step-00000003.safetensors"
    assert resolve_resume("latest", tmp_path / "fresh") is None
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(LdmError, match="checkpoint .* not found; pass --resume latest"):
        resolve_resume(str(tmp_path / "nope.safetensors"), tmp_path)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_image_grid_layout():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.1, 0.2, 0.3)])
    grid = image_grid(images, columns=2)
    assert grid.shape == (3, 4, 4)
    assert grid[0, 0, 0] == pytest.approx(0.1) and grid[0, 0, 2] == pytest.approx(0.2)
    assert grid[0, 2, 0] == pytest.approx(0.3) and grid[0, 2, 2] == 1.0  # empty cell stays white


def test_held_out_folder_config_keeps_the_layout_and_drops_augmentation():
    from ldm.data import DataConfig, Layout, held_out

    train = DataConfig(path="a", layout=Layout.CSV, metadata="m.csv", caption_column="c", resolution=32,
                       center_crop=False, random_flip=0.5)  # fmt: skip
    held = held_out(train, "b")
    assert (held.path, held.layout, held.metadata, held.caption_column, held.resolution) == ("b", Layout.CSV, "m.csv", "c", 32)
    assert held.center_crop and held.random_flip == 0.0
