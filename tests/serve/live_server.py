"""A server in a thread of the test process and an httpx client for it (the conftest's ``serve`` fixture and the
browser tests start theirs with it)."""

import httpx

from ldm.serve.api import ServeConfig
from ldm.serve.background import BackgroundServer


class Running(BackgroundServer):
    def __init__(self, config: ServeConfig):
        super().__init__(config)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        super().close()
