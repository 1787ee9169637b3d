"""The server's textual-inversion embeddings: /sdapi/v1/embeddings lists --embeddings-dir in A1111's shape, and
prompts name them as generate.py's do."""

import json

import torch
from safetensors.torch import save_file

from ldm.formats.embeddings import save_a1111
from ldm.io import sha256_file
from ldm.models.embeddings import Embedding


def test_embeddings_are_listed_and_used_by_name(serve, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    style = save_a1111(folder / "zqx-style.safetensors", Embedding(name="zqx-style", vectors=torch.ones(2, 32), step=40,
                                                                   checkpoint="0123456789", checkpoint_name="micro"))  # fmt: skip
    save_file({"emb_params": torch.ones(1, 768)}, str(folder / "sd1.safetensors"))  # another model's width
    torch.save({"string_to_param": {"*": torch.ones(1, 32)}}, folder / "pickled.pt")  # never unpickled here
    s = serve(embeddings_dir=folder)
    listed = s.client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"] == {"zqx-style": {"step": 40, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "micro",
                                              "shape": 32, "vectors": 2}}  # fmt: skip
    assert set(listed["skipped"]) == {"sd1", "pickled"} and listed["skipped"]["sd1"]["shape"] == 768
    body = {"prompt": "a (zqx-style:1.1) disc", "steps": 1, "width": 32, "height": 32, "seed": 1}
    r = s.client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert f'TI hashes: "zqx-style: {sha256_file(style)[:10]}"' in json.loads(r.json()["info"])["infotexts"][0]
    r = s.client.post("/sdapi/v1/txt2img", json=body | {"prompt": "a pickled disc"})
    assert r.status_code == 422 and "is a pickle" in r.json()["detail"]
