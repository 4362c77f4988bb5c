"""Tokenizer.from_folder: special tokens, add_bos_token, chat templates rendered as Hugging Face renders them,
and the core importing without the [text] extra."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from pagedkv.text import Tokenizer  # noqa: E402
from pagedkv.text.train import CHATML_TEMPLATE, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Meta-Llama-3-8B-Instruct's template (tokenizer_config.json), verbatim
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there!  "}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(path, 512)
    return path


def edit_config(folder, tmp_path, **changes):
    """A copy of ``folder`` with tokenizer_config.json fields changed (None deletes one)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_special_tokens_and_round_trip(folder):
    tok = Tokenizer.from_folder(folder)
    assert tok.vocab_size == 512
    assert tok.eos_token_id == tok.backend.token_to_id("<|im_end|>")
    assert tok.all_special_ids == sorted(tok.backend.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>",
                                                                              "<|im_end|>"))
    text = "Café 中文 😀 naïve — tabs\tand  spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    special = tok.encode("<|im_start|>hi<|im_end|>")
    assert special[0] == tok.backend.token_to_id("<|im_start|>")
    assert tok.decode(special) == "hi" and tok.decode(special, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_special_token_as_added_token_dict(folder, tmp_path):
    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, eos_token={"content": "<|endoftext|>", "lstrip": False}))
    assert tok.eos_token_id == tok.backend.token_to_id("<|endoftext|>")


def test_add_bos_token_overrides_the_post_processor(folder, tmp_path):
    bos = "<|endoftext|>"
    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, bos_token=bos, add_bos_token=True))
    assert tok.encode("hello")[0] == tok.bos_token_id and tok.encode("hello")[1:] == tok.encode("hello", False)
    assert tok.encode("hello", add_special_tokens=False)[0] != tok.bos_token_id
    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, bos_token=bos, add_bos_token=False))
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


def test_add_bos_false_drops_a_post_processor_bos(folder, tmp_path):
    from tokenizers import processors

    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, bos_token="<|endoftext|>", add_bos_token=None))
    bos = tok.bos_token_id
    tok.backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                               special_tokens=[("<|endoftext|>", bos)])
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_folder(tmp_path).encode("hi")[0] == bos  # the post-processor's own BOS
    edit_config(tmp_path, tmp_path, add_bos_token=False)
    assert Tokenizer.from_folder(tmp_path).encode("hi") == Tokenizer.from_folder(tmp_path).encode("hi", False)


def test_chatml_template_renders_and_tokenizes(folder):
    tok = Tokenizer.from_folder(folder)
    text = tok.apply_chat_template(CONVERSATION)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Hi there!  <|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == text[:-len("<|im_start|>assistant\n")]
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert ids == tok.encode(text, add_special_tokens=False) and ids[0] == tok.backend.token_to_id("<|im_start|>")


def test_llama3_template_with_bos_and_trim(folder, tmp_path):
    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, bos_token="<|endoftext|>",
                                            chat_template=LLAMA3_TEMPLATE))
    assert tok.apply_chat_template(CONVERSATION[1:]) == (
        "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_trim_blocks_and_lstrip_blocks(folder):
    tok = Tokenizer.from_folder(folder)
    template = "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n    {{ m['content'] }}!\n    {% endif %}\n" \
               "{% endfor %}"
    # lstrip_blocks removes the spaces before a block tag, trim_blocks the newline after it; {{ }} keeps its indent
    assert tok.apply_chat_template(CONVERSATION, chat_template=template) == "      Hi there!  !\n"


def test_named_templates_and_template_file(folder, tmp_path):
    named = [{"name": "default", "template": CHATML_TEMPLATE},
             {"name": "plain", "template": "{{ messages[0]['content'] }}"}]
    tok = Tokenizer.from_folder(edit_config(folder, tmp_path, chat_template=named))
    assert tok.apply_chat_template(CONVERSATION, chat_template="plain") == "Be brief."
    assert tok.apply_chat_template(CONVERSATION).startswith("<|im_start|>system")
    with pytest.raises(ValueError, match="no chat template named 'nope'"):
        tok.apply_chat_template(CONVERSATION, chat_template="nope")
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }} messages")
    assert Tokenizer.from_folder(tmp_path).apply_chat_template(CONVERSATION) == "2 messages"


def test_template_helpers(folder):
    tok = Tokenizer.from_folder(folder)
    tpl = "{{ messages[0] | tojson }}|{{ strftime_now('%Y') | length }}|{{ eos_token }}|{{ greeting }}" \
          "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}[{{ m.role }}]" \
          "{% endgeneration %}{% endfor %}"
    out = tok.apply_chat_template([{"role": "user", "content": "<é>"}], chat_template=tpl, greeting="hey")
    assert out == '{"role": "user", "content": "<é>"}|4|<|im_end|>|hey[user]'  # no HTML escaping, no \\u00e9


def test_template_errors_are_value_errors(folder, tmp_path):
    tok = Tokenizer.from_folder(folder)
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(CONVERSATION, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError):  # the sandbox is immutable: templates cannot change the caller's messages
        tok.apply_chat_template(CONVERSATION, chat_template="{% set _ = messages.append(1) %}")
    assert len(CONVERSATION) == 2
    with pytest.raises(ValueError, match="syntax error"):
        tok.apply_chat_template(CONVERSATION, chat_template="{% for %}")
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        tok.apply_chat_template(["hi"])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_folder(edit_config(folder, tmp_path, chat_template=None)).apply_chat_template(CONVERSATION)


def test_bad_folders(folder, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be read"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer.from_folder(edit_config(folder, tmp_path, eos_token="<nope>"))
    with pytest.raises(ValueError, match="chat_template must be"):
        Tokenizer.from_folder(edit_config(folder, tmp_path, chat_template=3))
    with pytest.raises(ValueError, match="vocab_size must be"):
        train_tokenizer(tmp_path / "t", 100)


def test_core_imports_without_the_text_extra(folder):
    probe = (
        "import sys\n"
        "for name in ('tokenizers', 'jinja2', 'fastapi', 'uvicorn'): sys.modules[name] = None\n"
        "import pagedkv, pagedkv.text, pagedkv.llm, pagedkv.serve\n"
        "from pagedkv.text import Tokenizer\n"
        "try:\n"
        f"    Tokenizer.from_folder({str(folder)!r})\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "pip install 'pagedkv[text]'" in run.stdout and "tokenizers" in run.stdout
