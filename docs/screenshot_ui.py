"""Take the README's picture of the web page: ``python -m ldm serve``'s page in headless Chromium, after a generation.

    python docs/screenshot_ui.py                   # → docs/serve-ui.png, from models/emoji-tiny

The server runs in this process (nothing saved); the page is driven as a user would: two prompts typed, a batch of
four generated for each (the gallery keeps both), the second image picked. Needs the ``serve`` extra (playwright) and a Chromium (``apt-get install
chromium``); no browser is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from ldm.io import atomic_write
from ldm.serve.api import ServeConfig
from ldm.serve.background import BackgroundServer

HERE = Path(__file__).resolve().parent
RUNS = [  # what is typed before each click on Generate
    {"#prompt": "red apple", "#steps": "20", "#seed": "0", "#batch_size": "4"},
    {"#prompt": "cat face", "#negative_prompt": "blurry", "#seed": "3"},
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=HERE.parent / "models" / "emoji-tiny", help="a bundle folder")
    p.add_argument("--out", type=Path, default=HERE / "serve-ui.png")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    model = args.model.resolve()
    config = ServeConfig(models_dir=model.parent, model=model.name, out=None, device="cpu")
    with BackgroundServer(config) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(server.url)
        expect(page.locator("#sampler_name")).to_have_value("DPM++ 2M")
        for made, fields in enumerate(RUNS, 1):
            for selector, value in fields.items():
                page.fill(selector, value)
            page.click("#go")
            expect(page.locator("#gallery img")).to_have_count(4 * made, timeout=120_000)
        page.locator("#gallery img").nth(1).click()
        with tempfile.TemporaryDirectory() as scratch:  # the shot is taken whole, then moved into place
            shot = Path(scratch) / "page.png"
            page.screenshot(path=shot, full_page=True)
            atomic_write(args.out, lambda tmp: shutil.copyfile(shot, tmp))
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
