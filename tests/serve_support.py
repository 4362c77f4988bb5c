"""Helpers of the server tests (no tests here): ``pagedkv serve ARGS`` live in this process (the console
script's own flag parsing and model loading, uvicorn in a thread on a free port), raw-HTTP checks of OpenAI's
error JSON, /metrics parsed by prometheus_client, and latency measurements."""
import statistics
import threading
import time
from types import SimpleNamespace

import httpx
from test_text_support import LiveServer

from pagedkv.serve.cli import build_parser, build_server

ENGINE_FLAGS = ["--device", "cpu", "--num-gpu-blocks-override", "96", "--block-size", "16", "--max-model-len",
                "256", "--max-num-seqs", "64"]


def serve(argv: list[str], **state_fields) -> SimpleNamespace:
    """``pagedkv serve *argv`` live; ``.stop()`` when done. ``.state`` is the server's shared state
    (``state_fields`` set on it before it starts)."""
    app, state = build_server(build_parser().parse_args(argv))
    for name, value in state_fields.items():
        setattr(state, name, value)
    live = LiveServer(app)
    http = httpx.Client(timeout=120)  # NOTE: one client: a new one per call costs ~50 ms of this process's GIL

    def stop():
        http.close()
        live.stop()
    return SimpleNamespace(base=live.base, url=live.url, model=state.model_name, state=state, stop=stop,
                           max_model_len=state.max_model_len, http=http)


def assert_openai_error(response, status: int, param=None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def metrics(base: str) -> dict:
    """``/metrics`` parsed by prometheus_client: sample name -> value (summed over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def timed_completion(server, max_tokens=8, prompt="The victim asks", **extra) -> float:
    """Seconds for one non-streamed completion of ``max_tokens`` tokens (ignore_eos)."""
    t0 = time.perf_counter()
    r = server.http.post(server.url + "/completions", json={"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "ignore_eos": True, "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] == max_tokens
    return time.perf_counter() - t0


def idle_latency(server, runs=5, **kwargs) -> float:
    timed_completion(server, **kwargs)  # warm
    return statistics.median(timed_completion(server, **kwargs) for _ in range(runs))


FLOOD = r"""
import asyncio, json, sys, time
import httpx
url, concurrency, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
bodies = json.load(open(path))
async def run():
    limit, out, t0 = asyncio.Semaphore(concurrency), [], time.perf_counter()
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(body):
            async with limit:
                r = await client.post(url, json=body)
                out.append((r.status_code, time.perf_counter() - t0))
        print("started", flush=True)
        await asyncio.gather(*(one(b) for b in bodies))
    print(json.dumps(out), flush=True)
asyncio.run(run())
"""


class Flood:
    """Another client: POSTs every body from a process of its own (its own GIL, as a real client would be),
    at most ``concurrency`` at once. ``wait()`` returns [(status, seconds since its start)]."""

    def __init__(self, server, bodies, path="/completions", concurrency=None):
        import json
        import subprocess
        import sys
        import tempfile

        self.file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump(bodies, self.file)
        self.file.close()
        self.proc = subprocess.Popen([sys.executable, "-c", FLOOD, server.url + path, str(concurrency or len(bodies)),
                                      self.file.name], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "started"

    def wait(self, timeout=300) -> list:
        import json
        import os

        out, _ = self.proc.communicate(timeout=timeout)
        os.unlink(self.file.name)
        return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


class HealthWatch:
    """Polls ``/health`` every 50 ms in a thread; ``worst`` is the slowest answer (or timeout) seen."""

    def __init__(self, base: str, timeout: float = 5.0):
        self.base, self.timeout, self.worst, self.failures = base, timeout, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=self.timeout) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.base + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.failures += not ok
                self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(self.timeout + 1)
