"""IncrementalDetokenizer: incremental text == full decode (multi-byte characters split across tokens), stop
strings matched on the text wherever they fall, and ``.text`` never shrinks."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("tokenizers")

from pagedkv.engine import SamplingParams  # noqa: E402
from pagedkv.text import IncrementalDetokenizer, Tokenizer  # noqa: E402
from pagedkv.text.train import train_tokenizer  # noqa: E402

VOCAB = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)


def byte_token_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (byte-level BPE: byte b is the token bytes_to_unicode()[b])."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    return [tok.backend.token_to_id(chars[b]) for b in text.encode("utf-8")]


def feed(tok, prompt, out, params=None, chunks=None):
    """Run a detokenizer over ``out`` (in ``chunks`` sizes); returns it and every ``.text`` it showed."""
    d = IncrementalDetokenizer(tok, prompt, params)
    seen, i = [], 0
    for size in chunks or [1] * len(out):
        if d.finished or i >= len(out):
            break
        d.update(out[i:i + size])
        i += size
        seen.append(d.text)
    if not d.finished and i < len(out):
        d.update(out[i:])
        seen.append(d.text)
    d.finish()
    seen.append(d.text)
    return d, seen


def assert_grows(seen):
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a), (a, b)


def test_multibyte_character_waits_for_its_last_byte(tok):
    prompt = tok.encode("Say:")
    d = IncrementalDetokenizer(tok, prompt, SamplingParams())
    ids = byte_token_ids(tok, "é😀")  # 2 + 4 bytes, one token each
    shown = []
    for t in ids:
        d.update([t])
        shown.append(d.text)
    assert shown == ["", "é", "é", "é", "é", "é😀"]


def test_truncated_character_is_flushed_as_replacement_at_finish(tok):
    d = IncrementalDetokenizer(tok, tok.encode("x"), SamplingParams())
    d.update(byte_token_ids(tok, "a中")[:3])  # "a" + 2 of the 3 bytes of 中
    assert d.text == ""  # the window ends mid-character: "a" waits with it
    d.finish()
    assert d.text == "a\ufffd" == tok.decode(byte_token_ids(tok, "a中")[:3])


@given(st.lists(st.integers(0, VOCAB - 1), max_size=40), st.booleans(), st.data())
def test_incremental_text_equals_full_decode(tok, out, skip_special, data):
    prompt = tok.encode(data.draw(st.sampled_from(["", "Hello", "中文", "a 😀"]))) or [tok.encode("x")[0]]
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(out)))
    d, seen = feed(tok, prompt, out, SamplingParams(skip_special_tokens=skip_special), chunks)
    assert d.text == tok.decode(out, skip_special_tokens=skip_special)
    assert_grows(seen)
    assert d.stop_reason is None


@given(st.text(alphabet="ab中😀é \n", min_size=1, max_size=30), st.data())
def test_bytes_split_anywhere_decode_to_the_text(tok, text, data):
    ids = byte_token_ids(tok, text)
    chunks = data.draw(st.lists(st.integers(1, 5), max_size=len(ids)))
    d, seen = feed(tok, tok.encode("Q:"), ids, SamplingParams(), chunks)
    assert d.text == text
    assert_grows(seen)
    assert all(seen_text == text[:len(seen_text)] and "\ufffd" not in seen_text for seen_text in seen)


def first_stop(text: str, stops) -> tuple[int, str] | None:
    """Reference: characters arrive one at a time; the first stop string to end wins (the longest at a tie)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return end - len(s), s
    return None


def withheld(text: str, stops) -> int:
    """Reference: the longest tail of ``text`` that is a proper prefix of a stop string."""
    return max([n for n in range(1, len(text) + 1) for s in stops if len(s) > n and s.startswith(text[-n:])],
               default=0)


@given(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=30), st.data())
def test_stop_strings_at_every_position(tok, out, data):
    full = tok.decode(out)
    if not full:
        return
    i = data.draw(st.integers(0, len(full) - 1))
    j = data.draw(st.integers(i + 1, min(len(full), i + 6)))
    stops = [full[i:j]] + data.draw(st.lists(st.text(alphabet=full + "xyz", min_size=1, max_size=4), max_size=2))
    include = data.draw(st.booleans())
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(out)))
    d, seen = feed(tok, tok.encode("Hi"), out, SamplingParams(stop=stops, include_stop_str_in_output=include), chunks)
    start, stop = first_stop(full, stops)
    assert d.stop_reason == stop and d.finished
    assert d.text == full[:start + len(stop) if include else start]
    assert_grows(seen)


def test_stop_string_across_tokens_is_cut_and_tail_withheld(tok):
    params = SamplingParams(stop=("\n\n", "END"))
    d = IncrementalDetokenizer(tok, tok.encode("Q"), params)
    texts = []
    for piece in ["Hello", " world", "\n", "E", "N", "D"]:
        matched = d.update(tok.encode(piece, add_special_tokens=False))
        texts.append(d.text)
    assert texts == ["Hello", "Hello world", "Hello world", "Hello world\n", "Hello world\n", "Hello world\n"]
    assert matched == "END" and d.stop_reason == "END" and d.text == "Hello world\n"
    with pytest.raises(ValueError, match="already finished"):
        d.update([5])


@given(st.lists(st.sampled_from(["a", "b", "ab", "ba", "c", "\n"]), max_size=12),
       st.lists(st.text(alphabet="abc\n", min_size=1, max_size=3), min_size=1, max_size=3))
def test_withheld_tail_is_exactly_the_possible_stop_prefix(tok, pieces, stops):
    d = IncrementalDetokenizer(tok, tok.encode("Q"), SamplingParams(stop=stops))
    sofar = ""
    for piece in pieces:
        d.update(tok.encode(piece, add_special_tokens=False))
        sofar += piece
        hit = first_stop(sofar, stops)
        if hit is not None:
            assert d.finished and d.text == sofar[:hit[0]] and d.stop_reason == hit[1]
            return
        assert d.text == sofar[:len(sofar) - withheld(sofar, stops)]
    d.finish()
    assert d.text == sofar and d.stop_reason is None


def test_finish_releases_a_withheld_tail(tok):
    d = IncrementalDetokenizer(tok, tok.encode("Q"), SamplingParams(stop=("the end",)))
    d.update(tok.encode("so the e", add_special_tokens=False))
    assert d.text == "so "
    assert d.finish() is None and d.text == "so the e" and d.finished


def test_include_stop_str_releases_at_once(tok):
    d = IncrementalDetokenizer(tok, tok.encode("Q"), SamplingParams(stop=("ab",), include_stop_str_in_output=True))
    d.update(tok.encode("xa", add_special_tokens=False))
    assert d.text == "xa"
    assert d.update(tok.encode("bc", add_special_tokens=False)) == "ab" and d.text == "xab"


def test_first_output_token_keeps_its_leading_space_with_metaspace():
    """A SentencePiece-style decoder strips a leading space: the prompt's tail gives the first token context."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = Tokenizer(backend, {})
    assert tok.decode([2, 3]) == "world!"  # alone: the leading space is stripped
    d = IncrementalDetokenizer(tok, [1], SamplingParams())
    d.update([2])
    d.update([3])
    d.finish()
    assert d.text == " world!"  # after "Hello": the space belongs to the output


def test_the_stop_string_that_ends_first_wins(tok):
    """"ab" then "ba" arrives: "b" (ending at 2) completes before "aba" (ending at 3), though "aba" starts first."""
    d = IncrementalDetokenizer(tok, tok.encode("Q"), SamplingParams(stop=("aba", "b")))
    d.update(tok.encode("a", add_special_tokens=False))
    assert d.text == ""  # "a" may start "aba"
    assert d.update(tok.encode("ba", add_special_tokens=False)) == "b" and d.text == "a"
    d = IncrementalDetokenizer(tok, tok.encode("Q"), SamplingParams(stop=("b", "ab")))
    assert d.update(tok.encode("xab", add_special_tokens=False)) == "ab" and d.text == "x"  # same end: the longer
