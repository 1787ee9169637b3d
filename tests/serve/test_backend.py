"""python -m ldm serve --backend openvino: every model's UNet run by OpenVINO, torch's pixels, the PNGs saying so."""

import importlib.util
import json

import numpy as np
import pytest
from serve_images import decode

from ldm.accel.checks import Backend
from ldm.cli import serve as serve_cli
from ldm.cli.common import run_cli

BODY = {"prompt": "red apple", "steps": 3, "sampler_name": "DPM++ 2M", "seed": 5, "width": 64, "height": 64}


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino is not installed (pip install 'ldm[openvino]')")  # fmt: skip
def test_openvino_server_answers_with_torchs_pixels_and_records_it(serve):
    answers = {}
    for backend in Backend:
        r = serve(out=None, backend=backend).client.post("/sdapi/v1/txt2img", json=BODY)
        assert r.status_code == 200, r.text
        answers[backend] = r.json()
    pixels = {b: np.asarray(decode(a["images"][0]), np.int16) for b, a in answers.items()}
    assert np.abs(pixels[Backend.OPENVINO] - pixels[Backend.TORCH]).max() <= 1
    texts = {b: json.loads(a["info"])["infotexts"][0] for b, a in answers.items()}
    assert "Backend: openvino" in texts[Backend.OPENVINO] and "Backend" not in texts[Backend.TORCH]


@pytest.mark.parametrize(
    "flags, message",
    [(["--dtype", "fp16", "--device", "cpu"], "--backend openvino runs fp32 weights on the CPU, not --dtype fp16 on cpu"),
     (["--device", "cuda"], "--backend openvino runs fp32 weights on the CPU, not --dtype fp32 on cuda")],
)  # fmt: skip
def test_the_cli_refuses_what_openvino_cannot_run_in_one_line(flags, message, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # --device cuda gets past "no GPU visible"
    assert run_cli(serve_cli.main, ["--backend", "openvino", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
