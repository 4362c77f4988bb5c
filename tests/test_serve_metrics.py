"""/metrics through prometheus_client with vLLM's names (``pagedkv:`` prefix): parsed by its own parser,
histograms and counters move under load, one registry per server, and the periodic stats line in the log."""
import asyncio
import logging

import pytest

for _name in ("tokenizers", "jinja2", "fastapi", "uvicorn", "openai", "httpx", "prometheus_client"):
    pytest.importorskip(_name)

import httpx  # noqa: E402
import openai  # noqa: E402
from serve_support import ENGINE_FLAGS, metrics, serve  # noqa: E402
from test_text_support import write_checkpoint  # noqa: E402

from pagedkv.serve.metrics import ServerMetrics  # noqa: E402

GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
COUNTERS = ("prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
            "generation_tokens_total", "request_success_total")
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = serve([str(write_checkpoint(tmp_path_factory.mktemp("ckpt"))), "--served-model-name", "m", *ENGINE_FLAGS],
                 stats_log_interval_s=0.2)
    yield live
    live.stop()


def test_metrics_parse_with_vllm_names(server):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in GAUGES:
        assert families[f"pagedkv:{name}"].type == "gauge"
    for name in COUNTERS:
        assert families[f"pagedkv:{name[:-len('_total')]}"].type == "counter"
    for name in HISTOGRAMS:
        assert families[f"pagedkv:{name}"].type == "histogram"
    assert all(s.labels.get("model_name") == "m" for f in families.values() for s in f.samples
               if f.name.startswith("pagedkv:"))


def load(server, num=12):
    async def one(client, i):
        stream = await client.completions.create(model="m", prompt=f"Shared prefix of every request, then {i}",
                                                 max_tokens=6 + i % 3, stream=True, extra_body={"ignore_eos": True})
        return [c async for c in stream]

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(num)))

    return asyncio.run(all_of_them())


def test_histograms_and_counters_move_under_load(server, caplog):
    before = metrics(server.base)
    with caplog.at_level(logging.INFO, logger="pagedkv.serve"):
        load(server)
        load(server)  # the same prompts again: prefix-cache hits
        import time
        time.sleep(0.5)
    after = metrics(server.base)
    for name in HISTOGRAMS:
        assert after[f"pagedkv:{name}_count"] > before.get(f"pagedkv:{name}_count", 0), name
        assert after[f"pagedkv:{name}_sum"] >= before.get(f"pagedkv:{name}_sum", 0), name
    assert after["pagedkv:e2e_request_latency_seconds_count"] - \
        before.get("pagedkv:e2e_request_latency_seconds_count", 0) == 24
    generated = sum(6 + i % 3 for i in range(12)) * 2
    assert after["pagedkv:generation_tokens_total"] - before.get("pagedkv:generation_tokens_total", 0) == generated
    assert after["pagedkv:inter_token_latency_seconds_count"] - \
        before.get("pagedkv:inter_token_latency_seconds_count", 0) <= generated - 24
    assert after["pagedkv:request_success_total"] - before.get("pagedkv:request_success_total", 0) == 24
    assert after["pagedkv:prompt_tokens_total"] > before.get("pagedkv:prompt_tokens_total", 0)
    assert after["pagedkv:prefix_cache_queries_total"] > before.get("pagedkv:prefix_cache_queries_total", 0)
    assert after["pagedkv:prefix_cache_hits_total"] > before.get("pagedkv:prefix_cache_hits_total", 0)
    assert after["pagedkv:num_requests_running"] == after["pagedkv:num_requests_waiting"] == 0
    lines = [r.getMessage() for r in caplog.records if "Avg generation throughput" in r.getMessage()]
    assert lines and "Running:" in lines[0] and "KV cache usage" in lines[0] and "Prefix cache hit rate" in lines[0]


def test_each_server_has_its_own_registry():
    a, b = ServerMetrics("a"), ServerMetrics("b")
    a.e2e.observe(1.0)
    assert b"e2e_request_latency_seconds_count{model_name=\"a\"} 1.0" in a.exposition()
    assert b"e2e_request_latency_seconds_count{model_name=\"b\"} 0.0" in b.exposition()
