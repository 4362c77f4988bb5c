"""experiments.prefix_workloads at CPU sizes: its figures are computed, and on float32 the modes agree."""
import json

from experiments import prefix_workloads


def test_prefix_workloads_run_and_agree_on_the_cpu(tmp_path):
    out = tmp_path / "pw.json"
    args = ["--device", "cpu", "--num-prompts", "6", "--shared-len", "40", "--own-len", "10", "--output-len", "4",
            "--long-num-prompts", "3", "--long-min-len", "20", "--long-max-len", "60", "--long-min-output", "2",
            "--long-max-output", "6", "--chunk-budget", "16", "--max-num-seqs", "8", "--output-json", str(out)]
    assert prefix_workloads.main(args) == 0
    r = json.loads(out.read_text())
    shared, long = r["shared"], r["long"]
    # the document once; its last 8 tokens are copied from the first request's block, full after its prefill
    assert shared["caching_on"]["prompt_tokens_computed"] == 40 + 6 * 10
    assert shared["caching_off"]["prompt_tokens_computed"] == 6 * 50
    assert shared["requests_agree"] == 6 and shared["targets"]["prompt_tokens_vs_ideal"] == 1.0
    assert long["requests_agree"] == {"chunked": 3, "chunked_same_budget": 3, "unchunked": 3}
    assert long["chunked"]["max_num_batched_tokens"] == 16 and long["unchunked"]["max_num_batched_tokens"] == 66
    assert all(long[m]["prompt_tokens_computed"] == long["unchunked"]["prompt_tokens_computed"] for m in long
               if isinstance(long[m], dict) and "wall_s" in long[m])


def test_prefix_workloads_refuses_bad_sizes(capsys):
    import pytest

    with pytest.raises(SystemExit):
        prefix_workloads.main(["--num-prompts", "0"])
    assert "--num-prompts must be in [1, 4096], got 0" in capsys.readouterr().err
