"""The model runner's persistent metadata (issue 11): per-sequence rows updated only when a sequence's table
changes (the step plan carries it), every decode step's packed inputs equal to what the manager says, and
placeholders fed from the sampled-token buffer."""
import numpy as np
import pytest

from pagedkv.engine import EngineConfig, LLMEngine, SamplingParams
from pagedkv.engine.request import PLACEHOLDER


def engine(asynchronous=True, **kwargs):
    kwargs = {"device": "cpu", "block_size": 4, "num_blocks": 256, "seed": 0, **kwargs}
    return LLMEngine(EngineConfig(async_scheduling=asynchronous, **kwargs))


def prompts(num=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(3, 15))).tolist() for _ in range(num)]


def test_block_tables_are_read_again_only_for_sequences_that_changed():
    eng = engine()
    m, tables, reads = eng.manager, eng.runner.tables, []
    load = tables._load

    def counting_load(table, row):
        reads[-1].add(next(seq_id for seq_id, r in tables.row_of.items() if r == row))
        return load(table, row)
    tables._load = counting_load
    launch, changed = eng.runner.launch, []

    def spy(out):
        reads.append(set())
        live = {s.branch.seq_id: m.block_table(s.branch.seq_id) for s in out.seqs}
        changed.append({i for i, t in live.items() if previous.get(i) != t})
        previous.update(live)
        return launch(out)
    previous: dict = {}
    eng.runner.launch = spy
    eng.generate(prompts(), SamplingParams(n=2, temperature=0, max_tokens=20), progress=False)
    assert len(reads) >= 15
    for step_reads, step_changed in zip(reads, changed):
        assert step_reads == step_changed  # each new or grown (or copied-on-write) table read once, no other
    decode_reads = [len(r) for r in reads[3:]]
    assert np.mean(decode_reads) < 0.5 * 12  # 12 sequences decode; a block of 4 fills every 4th step


@pytest.mark.parametrize("asynchronous", [False, True])
def test_every_decode_steps_packed_inputs_match_the_manager(asynchronous):
    eng = engine(asynchronous, max_num_batched_tokens=16, max_num_seqs=6)
    m, runner, checked = eng.manager, eng.runner, [0]
    launch = runner.launch

    def spy(out):
        flight = launch(out)
        decode = all(s.num_tokens == 1 for s in out.seqs)
        if decode:
            v, n = runner.decode_inputs.host, len(out.seqs)
            for i, s in enumerate(out.seqs):
                table = m.block_table(s.branch.seq_id)
                assert v.block_tables[i, :len(table)].tolist() == table
                assert v.positions[i] == s.start and v.context_lens[i] == s.start + 1
                assert v.slot_mapping[i] == m.slots(s.branch.seq_id, s.start, s.end)[0]
                token = s.request.token_slice(s.branch, s.start, s.end)[0]
                if token == PLACEHOLDER:  # fed on the device from where the step before sampled it
                    assert asynchronous and v.src_rows[i] == s.branch.sample_pos >= 0
                else:
                    assert v.src_rows[i] == -1 and v.token_ids[i] == token
            assert (v.temperature[:n] == [s.request.params.temperature for s in out.seqs]).all()
            checked[0] += 1
        return flight
    runner.launch = spy
    params = [SamplingParams(temperature=t, max_tokens=12, seed=3) for t in (0.0, 0.5, 1.0)] * 2
    eng.generate(prompts(), params, progress=False)
    assert checked[0] > 5
