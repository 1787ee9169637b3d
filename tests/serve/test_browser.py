"""The web page at ``/`` driven in headless Chromium (playwright): what a user clicks, types, paints and drops.

One server (the micro bundle, 32×32 images, 2 steps) and one browser serve the module; each test gets a fresh page.
A failing test leaves a screenshot of its page in its tmp_path (the path is printed with the failure).
"""

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from live_server import Running
from PIL import Image

from ldm.formats.pngmeta import save_png
from ldm.serve.a1111 import Limits
from ldm.serve.api import ServeConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[serve]'")
CHROMIUM = os.environ.get("LDM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set LDM_CHROMIUM)", allow_module_level=True)
expect = sync_api.expect
expect.set_options(timeout=30_000)  # a loaded 2-core machine; waits end as soon as the page is there

pytestmark = pytest.mark.slow
SMALL = {"#steps": "2", "#width": "32", "#height": "32"}


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    for name in ("shiny", "matte"):  # listed by name only: no test here merges them
        (loras / f"{name}.safetensors").write_bytes(b"")
    config = ServeConfig(models_dir=models_dir, model="micro", lora_dir=loras, out=tmp_path_factory.mktemp("out"),
                         device="cpu", limits=Limits(max_side=128, max_steps=5000), preview_every=1)  # fmt: skip
    running = Running(config)
    yield running
    running.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} does not start under playwright: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(server, browser, request, tmp_path):
    """The page, loaded (models and samplers listed); JavaScript errors fail the test; a screenshot on failure."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url)
    expect(page.locator("#model option")).to_have_count(2)
    expect(page.locator("#sampler_name")).to_have_value("DPM++ 2M")
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed:
        shot = tmp_path / "page.png"
        page.screenshot(path=shot, full_page=True)
        print(f"screenshot of the failed page: {shot}")
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def fill(page, values: dict[str, str]) -> None:
    for selector, value in values.items():
        page.fill(selector, value)


def generate(page, count: int) -> None:
    """Click Generate and wait until the gallery holds ``count`` images."""
    page.click("#go")
    expect(page.locator("#gallery img")).to_have_count(count)
    expect(page.locator("#error")).to_have_text("")


def params(page) -> dict[str, str]:
    """The shown parameters' settings line as a dict."""
    last = page.locator("#params").inner_text().strip().splitlines()[-1]
    return dict(item.split(": ", 1) for item in last.split(", ") if ": " in item)


def pixels(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))))


def png_file(path: Path, parameters: str | None, size=(32, 32), colour=(200, 30, 30)) -> Path:
    return save_png(Image.new("RGB", size, colour), path, parameters)


def test_txt2img_seeds_and_the_gallery(page):
    fill(page, SMALL | {"#prompt": "red apple", "#seed": "7"})
    page.select_option("#sampler_name", "Euler")
    generate(page, 1)
    shown = page.locator("#params").inner_text()
    assert shown.startswith("red apple\n")
    assert {"Seed": "7", "Size": "32x32", "Steps": "2", "Sampler": "Euler"}.items() <= params(page).items()
    first = page.locator("#gallery img").first
    assert first.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
    # seed -1 draws one; "reuse last" puts it in the field, and it makes the same image again
    page.click("#random")
    expect(page.locator("#seed")).to_have_value("-1")
    generate(page, 2)
    drawn = params(page)["Seed"]
    assert drawn != "7"
    page.click("#reuse")
    expect(page.locator("#seed")).to_have_value(drawn)
    generate(page, 3)
    assert params(page)["Seed"] == drawn
    images = page.locator("#gallery img")
    assert pixels(images.nth(0).get_attribute("src")).tolist() == pixels(images.nth(1).get_attribute("src")).tolist()
    # the gallery keeps the session's images, newest first; picking an older one shows its parameters
    images.nth(2).click()
    assert params(page)["Seed"] == "7"
    expect(images.nth(2)).to_have_class("picked")
    page.click("#reuse")  # the picked image's seed
    expect(page.locator("#seed")).to_have_value("7")
    page.reload()  # a reload keeps them
    expect(page.locator("#gallery img")).to_have_count(3)


def test_progress_bar_and_preview_during_sampling_then_interrupt(page):
    fill(page, SMALL | {"#steps": "1000", "#seed": "3"})
    page.select_option("#sampler_name", "Euler")
    page.click("#go")
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#preview")).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    expect(page.locator("#progress-text")).to_contain_text("step")
    width = page.locator("#bar").evaluate("bar => bar.getBoundingClientRect().width")
    assert width > 0
    page.click("#stop")
    expect(page.locator("#gallery img")).to_have_count(1)
    assert int(params(page)["Steps"]) == 1000  # what was asked; the image is the interrupted one
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#progress-text")).to_have_text("")


def test_send_to_img2img_paint_a_mask_and_inpaint(page):
    fill(page, SMALL | {"#seed": "5", "#prompt": "blue disc"})
    generate(page, 1)
    made = page.locator("#gallery img").first.get_attribute("src")
    page.click("#send")
    expect(page.locator("#img-panel")).to_be_visible()
    expect(page.locator("#tab-img")).to_have_class("on")
    paint = page.locator("#paint")
    expect(paint).to_have_attribute("width", "32")
    box = paint.bounding_box()
    # a stroke across the top-left quarter, in one fast move (the brush must join the two ends)
    page.fill("#brush", "24")
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.2)
    page.mouse.up()
    fill(page, {"#denoising_strength": "0.6", "#mask_blur": "0"})
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, 2)
    body = sent.value.post_data_json
    assert pixels(body["init_images"][0])[..., :3].tolist() == pixels(made)[..., :3].tolist()
    mask = pixels(body["mask"])[..., 0]  # (32, 32): white where painted
    assert mask.shape == (32, 32)
    assert mask[6, 3] == mask[6, 8] == mask[6, 12] == 255 and mask[28, 28] == 0 and mask[28, 3] == 0
    assert body["denoising_strength"] == 0.6 and body["mask_blur"] == 0
    settings = params(page)
    assert settings["Denoising strength"] == "0.6" and settings["Mask blur"] == "0"
    result = pixels(page.locator("#gallery img").first.get_attribute("src"))
    assert result.shape[:2] == (32, 32)
    assert np.array_equal(result[28, 28], pixels(made)[28, 28])  # unpainted pixels are the original's
    assert not np.array_equal(result[4:8, 2:14], pixels(made)[4:8, 2:14])
    page.click("#clear")
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, 3)
    assert "mask" not in sent.value.post_data_json  # no paint: plain img2img


def test_an_init_image_from_a_file(page, tmp_path):
    page.click("#tab-img")
    page.set_input_files("#init", png_file(tmp_path / "init.png", None, size=(40, 24)))
    expect(page.locator("#paint")).to_have_attribute("width", "40")
    fill(page, {"#steps": "2", "#denoising_strength": "0.5"})
    with page.expect_request("**/sdapi/v1/img2img") as sent:
        generate(page, 1)
    assert pixels(sent.value.post_data_json["init_images"][0]).shape[:2] == (24, 40)
    assert params(page)["Size"] == "40x24"


def drop(page, selector: str, path: Path) -> bool:
    """Drop a file on an element as a user drags one from a file manager; False when the page took the drop."""
    data = list(path.read_bytes())
    return page.evaluate(
        """([selector, name, data]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(data)], name, {type: "image/png"}));
            const target = document.querySelector(selector);
            target.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            return target.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [selector, path.name, data],
    )


def test_dropping_a_png_reads_its_parameters(page, tmp_path):
    text = ("a castle <lora:shiny:0.7>\nNegative prompt: fog\nSteps: 13, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 6, Seed: 1234, Size: 48x40, Model: micro-b")  # fmt: skip
    assert drop(page, "#drop", png_file(tmp_path / "a.png", text)) is False
    expect(page.locator("#params")).to_have_text(text)
    expected = {"#prompt": "a castle <lora:shiny:0.7>", "#negative_prompt": "fog", "#steps": "13", "#cfg_scale": "6",
                "#seed": "1234", "#width": "48", "#height": "40", "#sampler_name": "DPM++ 2M Karras",
                "#model": "micro-b"}  # fmt: skip
    for selector, value in expected.items():
        expect(page.locator(selector)).to_have_value(value)
    assert drop(page, "#drop", png_file(tmp_path / "plain.png", None)) is False
    expect(page.locator("#params")).to_have_text("(no parameters in this PNG)")
    expect(page.locator("#prompt")).to_have_value("a castle <lora:shiny:0.7>")  # left as it was
    # the file button does the same; a drop beside the zone does not open the file in place of the page
    page.set_input_files("#png-file", tmp_path / "a.png")
    expect(page.locator("#params")).to_have_text(text)
    assert drop(page, "h1", tmp_path / "a.png") is False
    assert page.url.rstrip("/") == page.evaluate("location.origin")


def test_the_lora_choice_adds_tags_and_errors_are_shown(page):
    page.fill("#prompt", "red apple")
    page.select_option("#lora", "shiny")
    page.fill("#lora_scale", "0.8")
    page.click("#add-lora")
    page.select_option("#lora", "matte")
    page.fill("#lora_scale", "0.5")
    page.click("#add-lora")
    expect(page.locator("#prompt")).to_have_value("red apple <lora:shiny:0.8> <lora:matte:0.5>")
    page.fill("#prompt", "red apple <lora:nope:1>")
    fill(page, SMALL)
    page.click("#go")
    expect(page.locator("#error")).to_contain_text("no LoRA 'nope'")
    expect(page.locator("#gallery img")).to_have_count(0)
