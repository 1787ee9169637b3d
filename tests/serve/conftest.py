import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from live_server import Running  # noqa: E402

from ldm.serve.a1111 import Limits  # noqa: E402
from ldm.serve.api import ServeConfig  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(micro_bundle_dir, tmp_path_factory):
    """A models folder holding the micro bundle twice (two names to switch between)."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "micro").symlink_to(micro_bundle_dir, target_is_directory=True)
    (folder / "micro-b").symlink_to(micro_bundle_dir, target_is_directory=True)
    (folder / "notes.txt").write_text("not a model")
    return folder


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
