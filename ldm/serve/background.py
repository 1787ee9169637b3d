"""The server in a thread of the calling process, on a free local port: for programs that drive it from the same
process (the tests, ``bench/serve.py``, ``docs/screenshot_ui.py``)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ldm.serve.api import ServeConfig, create_app


class BackgroundServer:
    """``create_app(config)`` on uvicorn at ``self.url`` (127.0.0.1, a port nothing else holds) until :meth:`close`;
    a ``with`` block closes it too."""

    def __init__(self, config: ServeConfig, *, start_timeout: float = 30.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, name="ldm-serve", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on port {self.port} did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()
