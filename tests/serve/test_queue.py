import itertools
import json
import threading
import time

import httpx

LONG = {"prompt": "x", "steps": 1000, "sampler_name": "euler", "width": 32, "height": 32, "seed": 3}


def wait_for(client, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if check(progress):
            return progress
        time.sleep(0.02)
    raise AssertionError(f"timed out; last progress: {progress}")


def hold(s):
    """Occupy the server's generation thread until the returned event is set: what queues behind it stays queued
    however fast or slow this machine is."""
    release = threading.Event()
    task = s.app.state.server.worker.submit(lambda: release.wait(60), steps=0)
    assert task.started.wait(30)
    return release


def post_in_thread(s, body, answers, key, timeout=60):
    def post():
        try:
            answers[key] = httpx.post(s.url + "/sdapi/v1/txt2img", json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            answers[key] = exc

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_interrupt_returns_what_it_has_and_previews_show(serve):
    s = serve(out=None)
    answers = {}
    thread = post_in_thread(s, LONG, answers, "long")
    progress = wait_for(s.client, lambda p: p["state"]["sampling_step"] >= 4 and p["current_image"])
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 1000
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert s.client.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
    thread.join(timeout=30)
    answer = answers["long"]
    assert answer.status_code == 200
    info = json.loads(answer.json()["info"])
    assert info["interrupted"] is True and len(answer.json()["images"]) == 1
    assert s.client.post("/sdapi/v1/interrupt").json() == {"interrupted": False}  # nothing runs now
    assert s.client.post("/sdapi/v1/txt2img", json=LONG | {"steps": 2}).status_code == 200  # no stale interrupt


def test_a_client_that_leaves_frees_its_place(serve):
    s = serve(out=None)
    answers = {}
    release = hold(s)
    try:
        leaver = post_in_thread(s, LONG | {"steps": 2}, answers, "leaver", timeout=0.5)
        wait_for(s.client, lambda p: p["state"]["job_count"] == 2, timeout=10)  # queued behind the held job
        leaver.join()
        assert isinstance(answers["leaver"], httpx.TimeoutException)
        wait_for(s.client, lambda p: p["state"]["job_count"] == 1, timeout=10)  # its place is given up
    finally:
        release.set()
    wait_for(s.client, lambda p: p["state"]["job_count"] == 0)
    assert s.client.post("/sdapi/v1/txt2img", json=LONG | {"steps": 2}).status_code == 200


def test_twenty_concurrent_requests_are_answered_in_order(serve, tmp_path):
    s = serve()
    answers, threads = {}, []
    release = hold(s)
    try:
        for i in range(20):
            threads.append(post_in_thread(s, LONG | {"steps": 1, "seed": 100 + i}, answers, i))
            wait_for(s.client, lambda p, n=i + 2: p["state"]["job_count"] >= n)  # queued before the next is sent
        assert s.client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 21  # all twenty wait
    finally:
        release.set()
    for thread in threads:
        thread.join(timeout=60)
    for i in range(20):
        assert answers[i].status_code == 200
        assert json.loads(answers[i].json()["info"])["all_seeds"] == [100 + i]
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == [f"{k:05d}-{100 + k}.png" for k in range(20)]  # saved in arrival order


def test_previews_are_decoded_only_when_a_progress_call_asks(serve):
    s = serve(out=None)
    worker = s.app.state.server.worker
    decoded = []
    preview = worker._preview
    worker._preview = lambda bundle, latents: decoded.append(latents.shape) or preview(bundle, latents)
    assert s.client.post("/sdapi/v1/txt2img", json=LONG | {"steps": 40}).status_code == 200
    assert decoded == []  # nobody watched
    for job_no, skip in ((2, True), (3, False)):  # watched without previews, then with
        answers = {}
        thread = post_in_thread(s, LONG | {"steps": 300}, answers, "job")
        deadline = time.monotonic() + 60
        for calls in itertools.count(1):
            assert time.monotonic() < deadline, "the 300-step job never reached step 20"
            state = s.client.get("/sdapi/v1/progress", params={"skip_current_image": skip}).json()["state"]
            # this job, not the last one's count; previews come every 2 steps in these servers
            if calls >= 5 and state["job_no"] == job_no and state["sampling_step"] >= 20:
                break
            time.sleep(0.02)
        s.client.post("/sdapi/v1/interrupt")
        thread.join(timeout=30)
        assert answers["job"].status_code == 200
        assert bool(decoded) is not skip, (skip, decoded)
