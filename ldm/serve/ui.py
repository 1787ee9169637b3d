"""The web page at ``/``: a hand-written HTML and JavaScript page that calls the API (Gradio would upgrade Pillow
and pull in pandas and more, so it is not used)."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def page_html() -> str:
    return (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
