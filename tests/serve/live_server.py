"""A server on a free port in a thread of the test process (the conftest's ``serve`` fixture and the browser
tests start theirs with it)."""

import socket
import threading
import time

import httpx
import uvicorn

from ldm.serve.api import ServeConfig, create_app


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
