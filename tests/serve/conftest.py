import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from ldm.serve.a1111 import Limits  # noqa: E402
from ldm.serve.api import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(micro_bundle_dir, tmp_path_factory):
    """A models folder holding the micro bundle twice (two names to switch between)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "micro").symlink_to(micro_bundle_dir, target_is_directory=True)
    (folder / "micro-b").symlink_to(micro_bundle_dir, target_is_directory=True)
    (folder / "notes.txt").write_text("not a model")
    return folder


class Running:
    """A server on a free port, in a thread, and an httpx client for it."""

    def __init__(self, config: ServeConfig):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def serve(models_dir, tmp_path):
    """``serve(**config)`` starts a server on the micro bundle, saving into tmp_path/out; closed after the test."""
    started = []

    def start(**overrides) -> Running:
        config = dict(models_dir=models_dir, model="micro", out=tmp_path / "out", device="cpu",
                      limits=Limits(max_side=128, max_steps=2000, max_images=8, max_body=1 << 20), preview_every=2)
        running = Running(ServeConfig(**(config | overrides)))
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()
