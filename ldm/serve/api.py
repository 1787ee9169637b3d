"""The HTTP API: A1111's ``/sdapi/v1`` routes on FastAPI, in front of one :class:`ldm.serve.worker.Worker`.

Every generation request is read into generate.py's own arguments (:mod:`ldm.serve.a1111`), resolved and checked
by :func:`ldm.cli.generate.resolve_settings` here (bad input is a 422 before it queues), then queued; the request
waits for its turn, and gives its place up when its client leaves first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import re
import secrets
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.datastructures import Headers

from ldm.accel.checks import Backend
from ldm.cli.generate import plan_batches, resolve_settings
from ldm.errors import LdmError
from ldm.formats.pngmeta import KEY, parse_parameters, png_bytes
from ldm.pipeline.schedule import SAMPLERS
from ldm.serve.a1111 import (
    BadRequest,
    Img2ImgRequest,
    Limits,
    Txt2ImgRequest,
    check_limits,
    decode_image,
    echo_parameters,
    info_json,
    to_arguments,
)
from ldm.serve.worker import Generated, Task, Worker

_TITLE_HASH = re.compile(r"\s*\[[0-9a-f]+\]$")  # A1111's checkpoint titles end in " [hash]"


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What ``python -m ldm serve`` serves and how; see :mod:`ldm.cli.serve` for the flags."""

    models_dir: Path
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None  # the embeddings prompts name; None: models/embeddings/ where it exists
    model: str | None = None  # the first model's name in models_dir; None: the first one listed
    out: Path | None = Path("outputs")  # None: images are not saved (--no-save)
    device: str = "auto"
    dtype: str = "fp32"
    limits: Limits = field(default_factory=Limits)
    auth: tuple[str, str] | None = None  # HTTP basic user and password; None: open
    preview_every: int | None = None  # sampling steps between /progress previews; 0: none; None: Worker's choice
    backend: Backend = Backend.TORCH  # what runs every model's UNet (generate.py --backend)


def list_models(folder: Path) -> dict[str, Path]:
    """The models a client may name: the bundles (folders with a manifest) and single-file checkpoints directly in
    ``folder``, by name. Nothing else is ever loaded."""
    if not folder.is_dir():
        return {}
    found = {p.name: p for p in folder.iterdir() if (p / "manifest.json").is_file() or p.suffix == ".safetensors"}
    return dict(sorted(found.items()))


def list_loras(folder: Path | None) -> dict[str, Path]:
    """The LoRA files in ``folder`` (``.safetensors``), by name without the suffix."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.safetensors")) if p.is_file()}


def list_embedding_files(folder: Path | None, *, width: int | None) -> dict:
    """``GET /sdapi/v1/embeddings``'s answer in A1111's shape: the embeddings of ``folder`` by name, ``loaded`` where
    they fit a text encoder ``width`` wide (any, for None), else ``skipped`` (as are files that do not read, and
    pickles, which the server never unpickles)."""
    from ldm.formats.embeddings import list_embeddings, read_embedding

    answer: dict[str, dict] = {"loaded": {}, "skipped": {}}
    for name, paths in (list_embeddings(folder) if folder is not None else {}).items():
        try:
            e = read_embedding(paths[0], name=name)
        except LdmError:
            answer["skipped"][name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                                       "vectors": None}  # fmt: skip
            continue
        entry = {"step": e.step, "sd_checkpoint": e.checkpoint, "sd_checkpoint_name": e.checkpoint_name,
                 "shape": e.width, "vectors": len(e)}  # fmt: skip
        answer["loaded" if width in (None, e.width) else "skipped"][name] = entry
    return answer


def _model_hash(path: Path) -> str | None:
    try:
        return json.loads((path / "manifest.json").read_text()).get("hash", "")[:10] or None
    except (OSError, ValueError):
        return None


class PngInfoRequest(BaseModel):
    image: str  # base64 PNG


class Server:
    """The app's state: the config, the worker, the model requests go to unless they override it."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.worker = Worker(out=config.out, preview_every=config.preview_every)
        self.scratch = Path(tempfile.mkdtemp(prefix="ldm-serve-"))  # request images when nothing is saved
        models = list_models(config.models_dir)
        if config.model is not None and config.model not in models:
            raise LdmError(f"--model {config.model!r} is not in {config.models_dir}; there: {', '.join(models) or 'none'}")
        if not models:
            raise LdmError(f"no model bundles in {config.models_dir}; pass --models-dir, or make one with "
                           f"`python -m ldm bundle create micro {config.models_dir}/micro`")  # fmt: skip
        self.model = config.model or next(iter(models))

    def model_path(self, name: str) -> Path:
        """A client's model name → its file or folder: only names in the models folder."""
        models = list_models(self.config.models_dir)
        name = _TITLE_HASH.sub("", str(name))
        if name not in models:
            raise LdmError(f"no model {name!r}; GET /sdapi/v1/sd-models lists them: {', '.join(models)}")
        return models[name]

    def settings(self, body: Txt2ImgRequest):
        """The request as generate.py's checked settings and plan (raises LdmError / BadRequest)."""
        check_limits(body, self.config.limits)
        model = self.model_path(body.override_settings.get("sd_model_checkpoint") or self.model)
        out = self.config.out
        inputs = out / "inputs" if out is not None else self.scratch
        args = to_arguments(body, model=model, loras=list_loras(self.config.lora_dir), out=out or self.scratch,
                            inputs=inputs, device=self.config.device, dtype=self.config.dtype,
                            embeddings_dir=self.config.embeddings_dir, backend=self.config.backend.value)  # fmt: skip
        settings = resolve_settings(args)
        return settings, plan_batches(settings)

    async def run(self, work, request: HttpRequest | None = None, **sizes) -> Task | None:
        """``work`` queued and awaited: the worker wakes this handler when it is done (no polling while it runs).
        Until it starts, the client's leaving is checked every quarter second: None when it left and the task was
        dropped."""
        loop, finished = asyncio.get_running_loop(), asyncio.Event()
        task = self.worker.submit(work, on_done=lambda: loop.call_soon_threadsafe(finished.set), **sizes)
        while not finished.is_set():
            if request is not None and not task.started.is_set() and await request.is_disconnected():
                if self.worker.cancel(task):
                    return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), timeout=0.25)
        return task

    async def generate(self, body: Txt2ImgRequest, request: HttpRequest) -> Response | dict:
        settings, plan = await run_in_threadpool(self.settings, body)
        worker = self.worker
        task = await self.run(lambda: worker.generate(settings, plan, save=body.save_images), request,
                              steps=settings.steps, batches=plan.batches)  # fmt: skip
        if task is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if task.error is not None:
            raise task.error
        result: Generated = task.result
        images = [base64.b64encode(png_bytes(m.image, m.parameters.text())).decode() for m in result.made]
        info = info_json(body, settings, result.made, model_name=result.bundle_name, model_hash=result.bundle_hash,
                         interrupted=result.interrupted)  # fmt: skip
        return {"images": images if body.send_images else [], "parameters": echo_parameters(body), "info": info}

    def embeddings(self) -> dict:
        """The embeddings prompts may name, sorted by whether they fit the current model's text encoder."""
        from ldm.cli.embedding_inputs import embeddings_folder
        from ldm.formats.bundle import read_config

        path = self.model_path(self.model)
        width = read_config(path).text_encoder.width if (path / "manifest.json").is_file() else None
        return list_embedding_files(embeddings_folder(self.config.embeddings_dir), width=width)

    async def switch_model(self, name: str) -> None:
        """Make ``name`` the default model and load it now, in the queue's order (the old one is freed)."""
        path = self.model_path(name)
        body = Txt2ImgRequest(override_settings={"sd_model_checkpoint": path.name})
        settings, _ = await run_in_threadpool(self.settings, body)
        task = await self.run(lambda: self.worker.bundle(settings))
        if task.error is not None:
            raise task.error
        self.model = path.name


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {400: "BadRequest", 422: "Unprocessable"}.get(status, "Error"), "detail": message},
                        status_code=status)  # fmt: skip


def create_app(config: ServeConfig) -> FastAPI:
    """The FastAPI app: the ``/sdapi/v1`` routes, the web page at ``/``, auth and the body limit."""
    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        server.worker.stop()
        shutil.rmtree(server.scratch, ignore_errors=True)

    app = FastAPI(title="ldm", description="A1111-compatible text-to-image API of ldm", lifespan=lifespan)
    app.state.server = server

    app.add_middleware(Guard, config=config)

    @app.exception_handler(LdmError)
    async def bad_input(request: HttpRequest, exc: LdmError):
        return _error(422, str(exc))

    @app.exception_handler(BadRequest)
    async def unreadable(request: HttpRequest, exc: BadRequest):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def defect(request: HttpRequest, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: HttpRequest):
        return await server.generate(body, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest, request: HttpRequest):
        return await server.generate(body, request)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": name, "model_name": name, "hash": _model_hash(path), "sha256": None, "filename": name,
                 "config": None} for name, path in list_models(config.models_dir).items()]  # fmt: skip

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.label, "aliases": [s.name], "options": {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": server.model, "samples_save": config.out is not None,
                "outdir_samples": str(config.out) if config.out else ""}  # fmt: skip

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, object]):
        if "sd_model_checkpoint" in options:
            await server.switch_model(str(options["sd_model_checkpoint"]))
        return None

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        report = server.worker.progress(preview=not skip_current_image)
        if skip_current_image:
            report["current_image"] = None
        return report

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted": server.worker.interrupt()}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfoRequest):
        _, image = decode_image(body.image, what="image")
        text = image.info.get(KEY) if isinstance(image.info.get(KEY), str) else None
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != KEY}
        parameters = {}
        if text:
            try:
                prompt, negative, pairs = parse_parameters(text)
                parameters = {"Prompt": prompt, "Negative prompt": negative, **pairs}
            except LdmError:
                parameters = {}
        return {"info": text or "", "items": items, "parameters": parameters}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": path.name, "metadata": {}}
                for name, path in list_loras(config.lora_dir).items()]  # fmt: skip

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return await run_in_threadpool(server.embeddings)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        from ldm.serve.ui import page_html

        return page_html()

    return app


class Guard:
    """HTTP basic auth on every route when --api-auth is set, then the body size limit: a plain ASGI middleware, which
    (unlike FastAPI's ``@app.middleware``) leaves the request's disconnect notice to the route."""

    def __init__(self, app, *, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope), scope["method"])
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers, method: str) -> Response | None:
        config = self.config
        if config.auth is not None and not _authorized(headers.get("authorization"), config.auth):
            return JSONResponse({"detail": "Not authenticated"}, status_code=401, headers={"WWW-Authenticate": "Basic"})
        if method in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                return _error(411, "send the body with a Content-Length")
            if not length.isdigit() or int(length) > config.limits.max_body:
                return _error(413, f"the body is more than this server's {config.limits.max_body:,} bytes (--max-body)")
        return None


def _authorized(header: str | None, auth: tuple[str, str]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, auth[0]) & secrets.compare_digest(password, auth[1])
