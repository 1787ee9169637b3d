"""Textual inversion (Gal et al. 2022): train the vectors of one new word, the whole model frozen.

``train_unet.py --textual-inversion TOKEN`` runs this instead of UNet training (``textual_inversion`` in the run
config). The word's N vectors (``num_vectors``, A1111's vectors per token) start as the token embeddings of
``init_word`` and are the only trained parameters: the UNet, the VAE and the text encoder, its token table included,
stay as they are, bit for bit. The table is not grown: the vectors are a tensor of their own, put in the word's
place by the text encoder's first lookup (:mod:`ldm.models.embeddings`), the same path by which generation reads
embedding files, so what is trained is what is used.

Each training caption names TOKEN (a caption that does not becomes ``template``, ``"{token}, {caption}"`` by
default); the loss is the UNet run's (ε or v MSE, Min-SNR-γ, offset noise; ``ldm.train.unet``), and the data, feature
cache (latents only are used: the text changes with the vectors) and checkpoints are its too, so a run resumes exactly.
The result is ``OUT/TOKEN.safetensors`` in A1111's layout (``emb_params``, which A1111 and ComfyUI load from their
embeddings folders, as ``generate.py --embeddings`` does) and ``OUT/learned_embeds.safetensors`` in diffusers'.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ldm.errors import LdmError
from ldm.formats.bundle import Bundle
from ldm.formats.embeddings import save_a1111, save_diffusers
from ldm.models.embeddings import Embedding, EmbeddingSet, names_in
from ldm.models.labels import Conditioning
from ldm.models.presets import Task
from ldm.models.tokenizer import tokenize
from ldm.pipeline import Request, generate
from ldm.pipeline.schedule import get_sampler
from ldm.train.loop import (
    LRSchedule,
    Progress,
    StepFn,
    TrainConfig,
    TrainingState,
    backward_step,
    begin_run,
    held_run,
    image_grid,
    log_grid,
    make_ema,
    make_lr_scheduler,
    make_optimizer,
    resolve_resume,
)
from ldm.train.objectives import (
    alphas_cumprod,
    min_snr_weights,
    weighted_mse,
)
from ldm.train.unet import (
    RunResult,
    TextualInversionConfig,
    UNetRunConfig,
    ema_weights,
    load_base,
    noised_latents,
    train_timed,
    training_data,
    validation_prompts,
    with_model,
)

# A1111's defaults for embeddings: a high learning rate on a few vectors, batches of one, no warm-up, decay or EMA.
INVERSION_TRAIN = TrainConfig(
    output_dir="runs/ti", batch_size=1, lr=5e-3, weight_decay=0.0, lr_schedule=LRSchedule.CONSTANT, warmup_steps=0,
    max_steps=3000, ema_decay=0.0, checkpoint_every=500, sample_every=500,
)  # fmt: skip
DIFFUSERS_FILE = "learned_embeds.safetensors"


class WordVectors(nn.Module):
    """The trained word's (N, D) vectors, and the frozen text encoder and UNet they condition: (x_t, t, token ids in
    which the word's vectors are negative ids) → the UNet's prediction. The frozen parts are held in a tuple, not as
    submodules, so the vectors are all that is trained, checkpointed and synchronised between processes."""

    def __init__(self, vectors: torch.Tensor, *, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.vectors = nn.Parameter(vectors.detach().clone().float())  # (N, D)
        self.frozen = (unet, text_encoder)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, input_ids: torch.Tensor) -> torch.Tensor:
        unet, text_encoder = self.frozen
        context = text_encoder(input_ids, vectors=self.vectors).hidden_states  # (B, L, D)
        return unet(x_t, t, encoder_hidden_states=context).sample  # (B, C, h, w)


def init_vectors(base: Bundle, word: str, count: int) -> torch.Tensor:
    """(count, D) start vectors: the token embeddings of ``word``'s first ``count`` tokens, spread over the count
    (vector i is token ⌊i·T/count⌋ of the T taken), as A1111 starts its embeddings."""
    ids = base.tokenizer([word], add_special_tokens=False).input_ids[0][:count]
    if not ids:
        raise LdmError(f"--init-word {word!r} gives no tokens; pass a word, e.g. --init-word person")
    table = base.text_encoder.model.get_input_embeddings().weight.detach()  # (V, D)
    rows = [ids[i * len(ids) // count] for i in range(count)]
    return table[torch.tensor(rows, device=table.device)].float().cpu()  # (count, D)


def check_inversion(cfg: UNetRunConfig, base: Bundle) -> None:
    """Textual inversion trains a word for the bundle as it is: a text-to-image, text-conditioned model with its own
    schedule, and nothing else trained."""
    ti = cfg.textual_inversion
    if cfg.lora.rank or cfg.train_text_encoder:
        raise LdmError("--textual-inversion trains one word's vectors and nothing else; leave out --lora-rank and "
                       "--train-text-encoder")  # fmt: skip
    if cfg.task is not Task.TEXT_TO_IMAGE or base.config.task is not Task.TEXT_TO_IMAGE:
        raise LdmError(f"--textual-inversion trains a word for a text_to_image bundle; {cfg.bundle} is "
                       f"{base.config.task.value}: pass a text_to_image bundle and leave out --task")  # fmt: skip
    if cfg.conditioning is not Conditioning.TEXT or base.labels is not None:
        raise LdmError("--textual-inversion trains a word of a text prompt; the bundle and the run must be "
                       "text-conditioned (leave out --conditioning)")  # fmt: skip
    if cfg.model.schedule != base.config.schedule:
        raise LdmError("--textual-inversion trains against the bundle's UNet as it is; leave out --prediction and "
                       "model.schedule overrides")  # fmt: skip
    context = base.config.text_encoder.context_length
    if ti.num_vectors > context - 2:
        raise LdmError(f"--num-vectors {ti.num_vectors} is more than a prompt chunk holds ({context - 2}); 1 to 8 is "
                       "usual")  # fmt: skip


def training_prompt(caption: str, ti: TextualInversionConfig) -> str:
    """The caption when it names the token, else the template filled in with the two (no dangling comma when the
    caption is empty)."""
    if names_in(caption, [ti.token]):
        return caption
    return ti.template.format(token=ti.token, caption=caption).strip(" ,")


class PromptIds:
    """Captions → (B, L) token ids with the word as its vectors' negative ids (plain text, truncated like any
    caption), each distinct caption tokenized once."""

    def __init__(self, base: Bundle, words: EmbeddingSet, ti: TextualInversionConfig, *, device: torch.device):
        self.base, self.words, self.ti, self.device = base, words, ti, device
        self.known: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        te = self.base.config.text_encoder
        missing = [c for c in dict.fromkeys(captions) if c not in self.known]
        if missing:
            prompts = [training_prompt(c, self.ti) for c in missing]
            ids = tokenize(self.base.tokenizer, prompts, context_length=te.context_length, pad_id=te.pad_id,
                           embeddings=self.words)  # fmt: skip
            self.known.update(zip(missing, ids))
        return torch.stack([self.known[c] for c in captions]).to(self.device)  # (B, L)


def step_function(cfg: UNetRunConfig, base: Bundle, model: WordVectors, optimizer, lr_scheduler, prompt_ids: PromptIds,
                  *, accelerator: Accelerator) -> StepFn:  # fmt: skip
    """One micro-batch as the UNet run's (noise, timesteps, target, Min-SNR-weighted MSE), the gradient reaching the
    word's vectors only."""
    schedule = cfg.model.schedule
    ac = alphas_cumprod(schedule)
    noised = noised_latents(cfg, base, accelerator=accelerator)
    params = list(accelerator.unwrap_model(model).parameters())

    def step_fn(batch: dict, step: int) -> dict[str, float]:
        with accelerator.accumulate(model):
            _, t, x_t, target = noised(batch)
            prediction = model(x_t, t, input_ids=prompt_ids(batch["caption"]))
            weights = min_snr_weights(t, ac, gamma=cfg.loss.min_snr_gamma, prediction=schedule.prediction)
            loss = weighted_mse(prediction, target, weights)
            backward_step(accelerator, loss, optimizer, lr_scheduler, params=params, grad_clip=cfg.train.grad_clip)
        return {"loss": float(loss.detach())}

    return step_fn


def word(cfg: UNetRunConfig, base: Bundle, vectors: torch.Tensor, *, step: int | None = None) -> Embedding:
    """The trained word as an embedding, with what A1111 records of it (steps, the base model's hash and name)."""
    return Embedding(name=cfg.textual_inversion.token, vectors=vectors.detach().float().cpu(), step=step,
                     checkpoint=base.model_hash, checkpoint_name=base.name)  # fmt: skip


def validation(cfg: UNetRunConfig, base: Bundle, module: WordVectors, ema, *, prompts: list[str],
               accelerator: Accelerator):  # fmt: skip
    """``validate(step)``: on the main process, the sample grid of ``prompts`` drawn with the current vectors (the
    EMA's where there is one) as the word's embedding; the RNG is left as it was."""
    out, v, r = Path(cfg.train.output_dir), cfg.validation, cfg.data.resolution
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    request = Request(prompts=prompts, negative_prompts=[""] * len(prompts),
                      seeds=[v.seed + i for i in range(len(prompts))], steps=v.steps, guidance_scale=v.guidance_scale,
                      sampler=get_sampler(v.sampler), width=r, height=r)  # fmt: skip

    @torch.no_grad()
    def validate(step: int) -> None:
        if not accelerator.is_main_process:
            return
        with torch.random.fork_rng(devices=devices), ema_weights(ema, module):
            words = EmbeddingSet([word(cfg, base, module.vectors)])
            images = generate(base, replace(request, embeddings=words), progress=False)  # (N, 3, H, W) in [0, 1]
            log_grid(accelerator, "samples", image_grid(images, columns=len(images)), step, out)

    return validate


def run(cfg: UNetRunConfig, *, resume: str | None = None) -> RunResult:
    """Train the word's vectors as ``cfg`` says, from the checkpoint ``resume`` names ('latest' or a file; None: from
    the start), and write ``OUT/TOKEN.safetensors`` and ``OUT/learned_embeds.safetensors``."""
    cfg = with_model(cfg)
    return held_run(cfg.train, lambda accelerator: _run(cfg, accelerator, resume=resume))


def _run(cfg: UNetRunConfig, accelerator, *, resume: str | None) -> RunResult:
    """:func:`run` once the output folder is held."""
    ti, out = cfg.textual_inversion, Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, out)
    torch.manual_seed(cfg.train.seed)

    base = load_base(cfg, accelerator)
    check_inversion(cfg, base)
    data = training_data(cfg, base, accelerator)
    base.text_encoder.requires_grad_(False).eval()
    unet = base.unet.float().to(accelerator.device).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    module = WordVectors(init_vectors(base, ti.init_word, ti.num_vectors), unet=unet, text_encoder=base.text_encoder)
    module.to(accelerator.device)
    optimizer = make_optimizer(module.parameters(), cfg.train)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.train, processes=accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    ema = make_ema(module, cfg.train)
    state = TrainingState(models={"vectors": model}, optimizers={"vectors": optimizer},
                          schedulers={"vectors": lr_scheduler}, emas={"vectors": ema} if ema else {},
                          progress=Progress())  # fmt: skip
    begin_run(accelerator, state, config=cfg, resume=resume_path, output_dir=out, name="textual_inversion")

    words = EmbeddingSet([word(cfg, base, module.vectors)])  # the word's ids; the vectors come from the module
    prompt_ids = PromptIds(base, words, ti, device=accelerator.device)
    prompts = [training_prompt(p, ti) for p in validation_prompts(cfg, data.report)]
    validate = validation(cfg, base, module, ema, prompts=prompts, accelerator=accelerator)
    result = train_timed(
        accelerator, state, unet=unet, text_encoder=base.text_encoder, cfg=cfg.train, dataset=data.items,
        config=cfg, sample_fn=validate, ema_models=[(ema, model)] if ema else [], batch_order=data.order,
        step_fn=step_function(cfg, base, model, optimizer, lr_scheduler, prompt_ids, accelerator=accelerator),
    )  # fmt: skip
    if accelerator.is_main_process:
        finish(cfg, base, module, ema, validate, result)
    return result


def finish(cfg: UNetRunConfig, base: Bundle, module: WordVectors, ema, validate, result: RunResult) -> None:
    """The EMA vectors in (where there is an EMA), the final grid, then the two embedding files."""
    out, token = Path(cfg.train.output_dir), cfg.textual_inversion.token
    if ema is not None:
        ema.copy_to(module.parameters())
    validate(result.progress.step)
    trained = word(cfg, base, module.vectors, step=result.progress.step)
    result.embedding_path = save_a1111(out / f"{token}.safetensors", trained)
    save_diffusers(out / DIFFUSERS_FILE, trained)
    print(f"embedding written to {result.embedding_path} (A1111 layout; {out / DIFFUSERS_FILE} in diffusers'); use "
          f'it with: generate.py --model {cfg.bundle} --embedding {result.embedding_path} "{token} ..." (or put the '
          "file in models/embeddings/)")  # fmt: skip
