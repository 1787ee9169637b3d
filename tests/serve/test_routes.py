import base64
import json

from PIL import Image
from serve_images import b64_png, decode

SMALL = {"prompt": "x", "steps": 1, "width": 32, "height": 32, "seed": 1}


def test_listing_routes_and_model_switch(serve, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "shiny.safetensors").write_bytes(b"")
    (loras / "readme.txt").write_text("")
    s = serve(lora_dir=loras)
    c = s.client
    assert [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()] == ["micro", "micro-b"]
    names = {x["name"] for x in c.get("/sdapi/v1/samplers").json()}
    assert {"DPM++ 2M", "Euler a", "DDIM"} <= names
    assert [x["name"] for x in c.get("/sdapi/v1/loras").json()] == ["shiny"]
    assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "micro"
    assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "micro-b"}).status_code == 200
    assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "micro-b"
    for bad in ("../micro", "notes.txt", "/etc/passwd"):
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
        assert r.status_code == 422 and "no model" in r.json()["detail"]
    r = c.post("/sdapi/v1/txt2img", json=SMALL | {"override_settings": {"sd_model_checkpoint": "micro"}})
    assert r.status_code == 200
    assert "Model: micro" in json.loads(r.json()["info"])["infotexts"][0]
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/png-info"} <= set(paths)
    assert "<html" in c.get("/").text.lower()
    progress = c.get("/sdapi/v1/progress").json()
    assert progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_png_info_reads_the_parameters(serve):
    s = serve(out=None)
    (image,) = s.client.post("/sdapi/v1/txt2img", json=SMALL | {"negative_prompt": "dull"}).json()["images"]
    r = s.client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert r["info"] == decode(image).info["parameters"]
    assert r["parameters"]["Prompt"] == "x" and r["parameters"]["Negative prompt"] == "dull"
    assert r["parameters"]["Seed"] == "1"
    plain = s.client.post("/sdapi/v1/png-info", json={"image": b64_png(Image.new("RGB", (4, 4)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


def test_bad_requests_are_refused_and_the_server_goes_on(serve):
    s = serve(out=None)
    c = s.client
    cases = [
        ({**SMALL, "width": 4096}, 422, "width"),
        ({**SMALL, "steps": 5000}, 422, "steps"),
        ({**SMALL, "batch_size": 4, "n_iter": 4}, 422, "batch_size"),
        ({**SMALL, "width": 30}, 422, "multiple of 8"),
        ({**SMALL, "sampler_name": "nope"}, 422, "unknown sampler"),
        ({**SMALL, "prompt": "x <lora:../../etc/passwd:1>"}, 422, "no LoRA"),
        ({**SMALL, "override_settings": {"sd_model_checkpoint": "../micro"}}, 422, "no model"),
        ({**SMALL, "seed": -2}, 422, None),
        ({**SMALL, "steps": "many"}, 422, None),
    ]
    for body, status, words in cases:
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == status, (body, r.text)
        if words:
            assert words in r.json()["detail"], r.text
    img = {**SMALL, "init_images": ["%%%not base64"]}
    assert c.post("/sdapi/v1/img2img", json=img).status_code == 400
    img = {**SMALL, "init_images": [base64.b64encode(b"not an image").decode()]}
    r = c.post("/sdapi/v1/img2img", json=img)
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]
    black = b64_png(Image.new("L", (32, 32), 0))
    r = c.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64_png(Image.new("RGB", (32, 32)))], "mask": black})
    assert r.status_code == 422 and "no white pixel" in r.json()["detail"]
    r = c.post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = c.post("/sdapi/v1/png-info", json={"image": "A" * (2 << 20)})
    assert r.status_code == 413
    assert c.post("/sdapi/v1/png-info", json={"image": "@@"}).status_code == 400
    r = c.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_api_auth_guards_every_route(serve):
    s = serve(auth=("ann", "s3cret"), out=None)
    for method, path in [("get", "/sdapi/v1/sd-models"), ("get", "/docs"), ("get", "/"), ("get", "/sdapi/v1/progress"),
                         ("post", "/sdapi/v1/interrupt")]:
        assert getattr(s.client, method)(path).status_code == 401
    assert s.client.get("/sdapi/v1/options", auth=("ann", "wrong")).status_code == 401
    assert s.client.get("/sdapi/v1/options", headers={"authorization": "Basic %%%"}).status_code == 401
    r = s.client.post("/sdapi/v1/txt2img", json=SMALL, auth=("ann", "s3cret"))
    assert r.status_code == 200
