"""One generation thread and its queue: jobs run one at a time, in the order they came, on one loaded model.

The HTTP side only submits :class:`Task` objects and waits on them; everything that touches the model (loading,
switching, sampling, previews) happens on the worker thread, so no two jobs share the model's weights at once.
"""

from __future__ import annotations

import base64
import gc
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm import accel
from ldm.cli.generate import Made, Plan, Settings, image_path, load_model, make_images, next_index
from ldm.formats.bundle import Bundle
from ldm.formats.pngmeta import png_bytes, save_png
from ldm.images import signed_to_unit, to_uint8, uint8_to_pil
from ldm.pipeline import StopSampling, decode

PREVIEW_EVERY = 5  # sampling steps between previews where the full VAE decodes them


@dataclass(eq=False)
class Task:
    """One queued piece of work: ``run`` is called on the worker thread; ``result`` or ``error`` is set after."""

    run: Callable[[], object]
    steps: int = 0  # sampling steps per batch, for the progress fraction
    batches: int = 1
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # its client left before it started: skipped
    on_done: Callable[[], None] | None = None
    result: object = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Generated:
    """A finished generation: the kept images in order, where they were saved (empty with --no-save), and whether
    an interrupt cut it short."""

    made: list[Made]
    paths: list[Path]
    interrupted: bool
    bundle_name: str
    bundle_hash: str


def _model_key(settings: Settings) -> tuple:
    """What a loaded model depends on: a request that differs here needs another load."""
    vae = settings.vae
    return settings.model, settings.loras, settings.dtype, str(settings.device), vae, settings.backend


class Worker:
    """The generation thread. ``out``: where images are saved (None: not saved); ``preview_every``: steps between
    the decodes that /progress shows (0: none; None: every step with the model's tiny autoencoder, else every
    :data:`PREVIEW_EVERY`). A preview is decoded only after a /progress call asked for one, so a job nobody watches
    spends nothing on previews, and a watched one at most one decode per call."""

    def __init__(self, *, out: Path | None, preview_every: int | None = None):
        self.out, self.preview_every = out, preview_every
        self._queue: queue.Queue[Task | None] = queue.Queue()
        self._pending: list[Task] = []  # queued and running, in order
        self._lock = threading.Lock()
        self._interrupt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ldm-generation", daemon=True)
        self._bundle: Bundle | None = None
        self._key: tuple | None = None
        self._progress = {"job_no": 0, "step": 0, "steps": 0, "batch": 0, "started": 0.0, "preview": None}
        self._preview_asked = False  # a /progress call wants a newer preview

    # the HTTP side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._interrupt.set()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, run: Callable[[], object], *, steps: int = 0, batches: int = 1,
               on_done: Callable[[], None] | None = None) -> Task:  # fmt: skip
        """Queue ``run``; ``on_done`` is called on the worker thread once it has finished (an HTTP handler's wake-up)."""
        task = Task(run, steps=steps, batches=batches, on_done=on_done)
        with self._lock:
            self._pending.append(task)
        self._queue.put(task)
        return task

    def cancel(self, task: Task) -> bool:
        """Drop a task that has not started (its client left); False when it already runs."""
        with self._lock:
            if task.started.is_set():
                return False
            task.cancelled = True
            if task in self._pending:
                self._pending.remove(task)
            return True

    def position(self, task: Task) -> int:
        """0 for the running task, 1 for the next, …; -1 when it is not waiting."""
        with self._lock:
            return self._pending.index(task) if task in self._pending else -1

    def interrupt(self) -> bool:
        """Stop the running generation at its next step; it returns the images it has. False when none runs."""
        with self._lock:
            running = bool(self._pending) and self._pending[0].started.is_set()
        if running:
            self._interrupt.set()
        return running

    def progress(self, *, preview: bool = True) -> dict:
        """A1111's /progress: the fraction done of the running job, its ETA, the queue and the latest preview;
        ``preview``: the caller shows previews, so the job decodes the next one."""
        with self._lock:
            self._preview_asked |= preview
            count, running = len(self._pending), bool(self._pending) and self._pending[0].started.is_set()
            task = self._pending[0] if running else None
            p = dict(self._progress)
        fraction, eta = 0.0, 0.0
        steps = p["steps"] or (task.steps if task is not None else 0)  # the loop's count: img2img runs fewer
        if task is not None and steps:
            fraction = min(1.0, (p["batch"] * steps + p["step"]) / (steps * task.batches))
            elapsed = time.monotonic() - p["started"]
            eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
        state = {"skipped": False, "interrupted": self._interrupt.is_set(), "job": "generate" if running else "",
                 "job_count": count, "job_timestamp": "", "job_no": p["job_no"], "sampling_step": p["step"],
                 "sampling_steps": p["steps"]}  # fmt: skip
        return {"progress": fraction, "eta_relative": eta, "state": state,
                "current_image": p["preview"] if running else None, "textinfo": None}  # fmt: skip

    # the worker thread

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while (task := self._queue.get()) is not None:
            with self._lock:
                if task.cancelled:
                    continue
                task.started.set()
                self._interrupt.clear()
                self._progress.update(job_no=self._progress["job_no"] + 1, step=0, steps=task.steps, batch=0,
                                      started=time.monotonic(), preview=None)  # fmt: skip
            try:
                task.result = task.run()
            except BaseException as exc:  # handed to the waiting request, which answers with it
                task.error = exc
            finally:
                with self._lock:
                    if task in self._pending:
                        self._pending.remove(task)
                task.done.set()
                if task.on_done is not None:
                    try:
                        task.on_done()
                    except RuntimeError:  # the waiting event loop has closed (the server is stopping)
                        pass

    def bundle(self, settings: Settings) -> Bundle:
        """The model ``settings`` asks for, loaded once; another one replaces it (the old one freed first)."""
        key = _model_key(settings)
        if key != self._key:
            self._bundle, self._key = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            bundle = load_model(settings, quiet=True)
            if settings.backend is not accel.Backend.TORCH:  # the UNet converted once per load
                accel.prepare(bundle, backend=settings.backend)
            self._bundle, self._key = bundle, key
        return self._bundle

    def generate(self, settings: Settings, plan: Plan, *, save: bool = True) -> Generated:
        """Run a plan on the worker thread (call it from a task's ``run``), saving each image like generate.py."""
        bundle = self.bundle(settings)

        every = self.preview_every
        if every is None:
            every = 1 if bundle.tiny_vae is not None else PREVIEW_EVERY

        def on_step(done: int, total: int, latents: torch.Tensor) -> None:
            with self._lock:
                self._progress.update(step=done, steps=total)
                preview = every and done % every == 0 and done < total and self._preview_asked  # the last: the image
                self._preview_asked &= not preview
            if preview:
                self._preview(bundle, latents)
            if self._interrupt.is_set():
                raise StopSampling

        made = []
        for m in make_images(bundle, settings, plan, progress=False, on_step=on_step, stop=self._interrupt.is_set):
            made.append(m)
            with self._lock:
                self._progress["batch"] = len(made) // plan.batch_size
        paths = []
        if save and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for m in made:
                paths.append(save_png(m.image, image_path(self.out, next_index(self.out), m.job.seed),
                                      m.parameters.text()))  # fmt: skip
        return Generated(made, paths, self._interrupt.is_set(), bundle.name, bundle.short_hash)

    def _preview(self, bundle: Bundle, latents: torch.Tensor) -> None:
        """The first image of the batch, decoded from the current latents (by the tiny autoencoder where the model
        has one), as a base64 PNG for /progress."""
        image = decode(bundle, latents[:1], tiny=bundle.tiny_vae is not None)
        pixels = to_uint8(signed_to_unit(image))[0]  # (3, H, W)
        encoded = base64.b64encode(png_bytes(uint8_to_pil(pixels))).decode()
        with self._lock:
            self._progress["preview"] = encoded
