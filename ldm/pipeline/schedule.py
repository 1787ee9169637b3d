"""The diffusion schedule (DDPM, Ho et al. 2020) and the samplers that run it at inference.

The schedule fixes β_t for t = 0 … T-1 and what the UNet predicts; samplers are diffusers schedulers
built from it, named as A1111 names them so PNG metadata is read by other tools.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldm.errors import LdmError


class Prediction(enum.Enum):
    """What the UNet predicts from x_t: the noise ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022)."""

    EPSILON = "epsilon"
    V = "v_prediction"


class BetaSchedule(enum.Enum):
    LINEAR = "linear"  # β linear in t (Ho et al. 2020)
    SCALED_LINEAR = "scaled_linear"  # √β linear in t (Stable Diffusion)
    COSINE = "squaredcos_cap_v2"  # ᾱ_t = cos²(…) (Nichol & Dhariwal 2021)


class TimestepSpacing(enum.Enum):
    LEADING = "leading"  # SD 1.x/2.x convention, with steps_offset=1
    TRAILING = "trailing"  # includes t = T-1; better at few steps (Lin et al. 2023)
    LINSPACE = "linspace"


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: Prediction = Prediction.EPSILON
    timestep_spacing: TimestepSpacing = TimestepSpacing.LEADING
    steps_offset: int = 1

    def __post_init__(self):
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")

    def diffusers_config(self) -> dict:
        """The config of a neutral diffusers scheduler; every sampler is built from it."""
        return dict(
            DDIMScheduler(
                num_train_timesteps=self.num_train_timesteps,
                beta_start=self.beta_start,
                beta_end=self.beta_end,
                beta_schedule=self.beta_schedule.value,
                prediction_type=self.prediction.value,
                timestep_spacing=self.timestep_spacing.value,
                steps_offset=self.steps_offset,
                clip_sample=False,
                set_alpha_to_one=False,
            ).config
        )

    @classmethod
    def from_diffusers(cls, config: dict) -> ScheduleConfig:
        if config.get("trained_betas") is not None:
            raise ValueError("schedulers with explicit trained_betas are not supported")
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_schedule=BetaSchedule(config.get("beta_schedule", "linear")),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            prediction=Prediction(config.get("prediction_type", "epsilon")),
            timestep_spacing=TimestepSpacing(config.get("timestep_spacing", "leading")),
            steps_offset=config.get("steps_offset", 0),
        )


@dataclass(frozen=True)
class Sampler:
    name: str  # command-line name
    label: str  # A1111 name, written into PNG metadata
    scheduler: type[SchedulerMixin]
    options: tuple[tuple[str, object], ...] = ()


LCM_GRID_STEPS = 50  # the skipping-step grid consistency distillation trains on (LCMScheduler's original steps)

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddpm", "DDPM", DDPMScheduler),
        Sampler("ddim", "DDIM", DDIMScheduler),
        Sampler("pndm", "PLMS", PNDMScheduler, (("skip_prk_steps", True),)),
        Sampler("lms", "LMS", LMSDiscreteScheduler),
        Sampler("euler", "Euler", EulerDiscreteScheduler),
        Sampler("euler_a", "Euler a", EulerAncestralDiscreteScheduler),
        Sampler("heun", "Heun", HeunDiscreteScheduler),
        Sampler("dpmpp_2m", "DPM++ 2M", DPMSolverMultistepScheduler, (("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
        Sampler(
            "dpmpp_2m_karras",
            "DPM++ 2M Karras",
            DPMSolverMultistepScheduler,
            (("algorithm_type", "dpmsolver++"), ("solver_order", 2), ("use_karras_sigmas", True)),
        ),
        Sampler("unipc", "UniPC", UniPCMultistepScheduler),
        # Latent consistency sampling (Luo et al. 2023, Algorithm 3): for a consistency-distilled UNet (train_lcm.py)
        # or a bundle with an LCM-LoRA, in 1-8 steps; its steps are drawn from LCM_GRID_STEPS skipping steps.
        Sampler("lcm", "LCM", LCMScheduler, (("original_inference_steps", LCM_GRID_STEPS),)),
    )
}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by its command-line name or its A1111 label ("Euler a")."""
    for sampler in SAMPLERS.values():
        if name in (sampler.name, sampler.label):
            return sampler
    raise LdmError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")


def build_scheduler(schedule: ScheduleConfig, sampler: Sampler) -> SchedulerMixin:
    """A fresh (stateful) diffusers scheduler: one per generation call."""
    return sampler.scheduler.from_config(schedule.diffusers_config(), **dict(sampler.options))
