"""Smoke run of memory_share's beam-search scenario (experiments.memory_beam) with tiny sizes on the CPU: block
counts read from the pool, checked against what each mode must hold, and identical beams in both modes."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("experiments") is None:  # plain `pytest` (not `python -m pytest`) from elsewhere
    sys.path.insert(0, str(ROOT))

from experiments import memory_share  # noqa: E402
from pagedkv.beam.group import worst_case_blocks  # noqa: E402

BLOCK_SIZE, PROMPT_LEN, GEN_LEN, NUM_PROMPTS = 8, 13, 7, 2
ARGS = ["--num-requests", "2", "--num-branches", "2", "--prompt-len", "20", "--suffix-len", "2", "--gen-len", "2",
        "--block-size", str(BLOCK_SIZE), "--skip-model-check", "--beam-widths", "2", "3",
        "--beam-prompt-len", str(PROMPT_LEN), "--beam-gen-len", str(GEN_LEN),
        "--beam-num-prompts", str(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    path = tmp_path_factory.mktemp("beam") / "out.json"
    assert memory_share.main(ARGS + ["--device", "cpu", "--output-json", str(path)]) == 0
    return json.loads(path.read_text())


def test_beam_rows_measure_both_modes_from_the_pool(payload):
    rows = payload["beam_search"]
    assert [r["scenario"]["beam_width"] for r in rows] == [2, 3]
    for r in rows:
        w, copied, shared = r["scenario"]["beam_width"], r["copied"], r["shared"]
        assert r["identical"] and r["num_beams_compared"] == NUM_PROMPTS * w  # ignore_eos: w beams each
        # copied: every beam holds its own blocks for prompt + generated tokens but the last (never fed)
        longest = -(-(PROMPT_LEN + GEN_LEN - 1) // BLOCK_SIZE)
        assert copied["peak_used_blocks"] == NUM_PROMPTS * w * longest
        assert copied["num_cow_copies"] == 0
        # shared: the prompt's full block once, at most w private tails
        bound = NUM_PROMPTS * worst_case_blocks(PROMPT_LEN, GEN_LEN, w, BLOCK_SIZE, True)
        assert shared["peak_used_blocks"] <= r["shared_worst_case_blocks"] == bound < copied["peak_used_blocks"]
        assert shared["num_cow_copies"] > 0
        for m in (copied, shared):  # after the prefill and after each of the GEN_LEN - 1 decode steps
            timeline = m["timeline_used_blocks"]
            assert len(timeline) == GEN_LEN and timeline[-1] == 0
            assert m["peak_used_blocks"] == max(timeline[:-1])
            assert m["mean_used_blocks"] == pytest.approx(sum(timeline[:-1]) / (GEN_LEN - 1))
        assert r["peak_saved_pct"] == pytest.approx(100 * (1 - shared["peak_used_blocks"] /
                                                           copied["peak_used_blocks"]))
        assert 0 < r["mean_saved_pct"] < 100


def test_beam_verdicts_are_printed_with_the_others(payload):
    beam_lines = [v for v in payload["verdicts"] if v.startswith("beam search")]
    assert len(beam_lines) == 2 and all("beams identical" in v and "% saved at the peak" in v for v in beam_lines)
    assert payload["config"]["beam_widths"] == [2, 3]


def test_beam_scenario_can_be_skipped(tmp_path):
    path = tmp_path / "out.json"
    args = ARGS[:ARGS.index("--beam-widths")] + ["--beam-widths", "0"]
    assert memory_share.main(args + ["--device", "cpu", "--output-json", str(path)]) == 0
    assert json.loads(path.read_text())["beam_search"] == []


@pytest.mark.parametrize("flag, value", [("--beam-widths", "65"), ("--beam-gen-len", "0"),
                                         ("--beam-prompt-len", "0"), ("--beam-num-prompts", "0")])
def test_bad_beam_flags_are_one_line_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        memory_share.main(ARGS + ["--device", "cpu", flag, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {flag} must be in")


def test_the_scenario_alone(tmp_path, capsys):
    from experiments import memory_beam

    path = tmp_path / "beam.json"
    args = ARGS[ARGS.index("--block-size"):ARGS.index("--block-size") + 2] + ARGS[ARGS.index("--beam-widths"):]
    assert memory_beam.main(args + ["--device", "cpu", "--output-json", str(path)]) == 0
    alone = json.loads(path.read_text())
    assert [r["scenario"]["beam_width"] for r in alone["beam_search"]] == [2, 3]
    assert all(r["identical"] for r in alone["beam_search"])
    assert "KV blocks of beam search" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        memory_beam.main(["--device", "cpu", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
