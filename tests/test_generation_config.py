"""read_generation_config: EOS ids and sampling defaults as the checkpoint's authors configured them (issue 9)."""
import json

import pytest

from pagedkv.engine import SamplingParams
from pagedkv.model import GenerationConfig, read_generation_config


def folder_with(tmp_path, config=None, generation=None):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256, **(config or {})}))
    if generation is not None:
        text = generation if isinstance(generation, str) else json.dumps(generation)
        (tmp_path / "generation_config.json").write_text(text)
    return tmp_path


def test_llama3_instruct_eos_list_and_sampling_defaults(tmp_path):
    folder = folder_with(tmp_path, {"eos_token_id": 128001, "bos_token_id": 128000},
                         {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                          "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0"})
    g = read_generation_config(folder)
    assert g.eos_token_ids == (128001, 128008, 128009)
    assert (g.bos_token_id, g.pad_token_id) == (128000, None)
    assert g.defaults == {"temperature": 0.6, "top_p": 0.9} and g.notes == ()
    assert SamplingParams(**g.defaults).top_p == 0.9


def test_config_json_alone_and_the_union_of_both_files(tmp_path):
    assert read_generation_config(folder_with(tmp_path / "a", {"eos_token_id": 2})) == GenerationConfig((2,))
    g = read_generation_config(folder_with(tmp_path / "b", {"eos_token_id": [7, 2]}, {"eos_token_id": [2, 9]}))
    assert g.eos_token_ids == (7, 2, 9)
    assert read_generation_config(folder_with(tmp_path / "c", {"eos_token_id": None})).eos_token_ids == ()


def test_defaults_are_mapped_to_sampling_params_names(tmp_path):
    folder = folder_with(tmp_path, {}, {"max_new_tokens": 256, "top_k": 0, "min_p": 0.05, "do_sample": False,
                                        "temperature": 0.7, "repetition_penalty": 1.1, "max_length": 4096,
                                        "pad_token_id": -1})
    g = read_generation_config(folder)
    assert g.defaults == {"max_tokens": 256, "top_k": -1, "min_p": 0.05, "temperature": 0.0,
                          "repetition_penalty": 1.1}
    assert g.pad_token_id is None
    assert [n.split(": ", 1)[1].split()[0] for n in g.notes] == ["pad_token_id", "do_sample", "max_length"]
    SamplingParams(**g.defaults)


@pytest.mark.parametrize("config, generation, field", [
    ({"eos_token_id": "2"}, None, "eos_token_id"), ({"eos_token_id": [1, "x"]}, None, "eos_token_id"),
    ({"eos_token_id": -1}, None, "eos_token_id"), ({"eos_token_id": 128256}, None, "eos_token_id"),
    ({"eos_token_id": True}, None, "eos_token_id"), ({"eos_token_id": [[1]]}, None, "eos_token_id"),
    ({}, {"eos_token_id": 10**6}, "eos_token_id"), ({}, {"bos_token_id": 1.5}, "bos_token_id"),
    ({}, {"temperature": float("nan")}, "temperature"), ({}, {"temperature": -1}, "temperature"),
    ({}, {"top_p": 0}, "top_p"), ({}, {"top_p": 1.5}, "top_p"), ({}, {"top_k": -3}, "top_k"),
    ({}, {"min_p": 2}, "min_p"), ({}, {"max_new_tokens": 0}, "max_new_tokens"),
    ({}, {"do_sample": "yes"}, "do_sample"), ({}, {"repetition_penalty": 0}, "repetition_penalty"),
    ({}, {"min_new_tokens": -1}, "min_new_tokens"), ({}, "[1, 2]", "JSON object"), ({}, "{", "JSON"),
    ({"vocab_size": 0}, None, "vocab_size"),
])
def test_bad_values_raise_value_error_naming_file_and_field(tmp_path, config, generation, field):
    folder = folder_with(tmp_path, config, generation)
    with pytest.raises(ValueError) as info:
        read_generation_config(folder)
    message = str(info.value)
    assert field in message
    assert ("generation_config.json" if generation is not None else "config.json") in message


def test_missing_config_json_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        read_generation_config(tmp_path)


def test_penalties_and_min_new_tokens_are_honoured_and_the_rest_noted(tmp_path):
    g = read_generation_config(folder_with(tmp_path, {}, {"repetition_penalty": 1.3, "min_new_tokens": 4,
                                                          "no_repeat_ngram_size": 3, "bad_words_ids": [[5]]}))
    assert g.defaults == {"repetition_penalty": 1.3, "min_tokens": 4}
    assert [n.split(": ", 1)[1].split()[0] for n in g.notes] == ["no_repeat_ngram_size", "bad_words_ids"]
    assert SamplingParams(**g.defaults).repetition_penalty == 1.3
