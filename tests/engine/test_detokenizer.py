"""IncrementalDetokenizer against the real SmolLM2 byte-level BPE tokenizer."""
import random

import pytest

from model.loading.gguf_file import open_gguf
from model.loading import smollm2_path
from model.tokenizer import tokenizer_from_gguf
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.request import SamplingParams

IM_END = 2

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog, doesn't it?",
    "code": "def add(a, b):\n\t\"\"\"Sum.\"\"\"\n    return  a + b\n\n\nif x  >  1:\r\n        print(x)  \n",
    "chinese": "你好，世界！今天天气很好。我们去公园散步吧。",
    "emoji": "👨‍👩‍👧‍👦 family, 🇯🇵🇺🇸 flags, 👍🏽 skin tone, 🏳️‍🌈 and 😀",
    "mixed": "Prix: 42€ — naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어 🎉 done.",
}


@pytest.fixture(scope="module")
def tok():
    path = smollm2_path()
    return tokenizer_from_gguf(open_gguf(path), path)


def run(tok, ids, finish=True, **params):
    """Feed ids one at a time; return (pieces, texts emitted after each add, detokenizer)."""
    detok = IncrementalDetokenizer(tok, SamplingParams(**params))
    pieces, texts = [], []
    for token_id in ids:
        pieces.append(detok.add(token_id))
        texts.append(detok.text)
    if finish:
        pieces.append(detok.finish())
    assert "".join(pieces) == detok.text
    return pieces, texts, detok


def ids_of(tok, *parts):
    return [i for part in parts for i in tok.encode(part)]


def cuts_a_character(tok, ids) -> bool:
    data = b""
    for token_id in ids:
        data += tok.token_bytes(token_id)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


@pytest.mark.parametrize("name", TEXTS)
def test_streamed_pieces_join_to_decode(tok, name):
    ids = tok.encode(TEXTS[name])
    pieces, _, detok = run(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXTS[name]
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # no lone surrogates: every piece is valid text on its own
    assert pieces[-1] == ""  # nothing left over for finish()
    assert detok.stop_matched is None


@pytest.mark.parametrize("name", ["chinese", "emoji", "mixed"])
def test_token_boundary_inside_a_character_is_held(tok, name):
    ids = tok.encode(TEXTS[name])
    assert cuts_a_character(tok, ids)  # the test data really splits characters across tokens
    detok = IncrementalDetokenizer(tok, SamplingParams())
    data, num_held = b"", 0
    for token_id in ids:
        data += tok.token_bytes(token_id)
        piece = detok.add(token_id)
        complete = data.decode("utf-8", errors="ignore")
        assert detok.text == complete  # exactly the complete characters so far, no more, no less
        num_held += piece == ""
    assert num_held > 0


def test_stop_string_spanning_tokens_never_leaks(tok):
    text = "Hello world, this is a remarkable test of stop strings."
    for stop in [" remarkable test", "a remarkable test of"]:
        ids = tok.encode(text)
        full = tok.decode(ids)
        pieces, texts, detok = run(tok, ids + tok.encode(" more"), stop=[stop])
        assert detok.stop_matched == stop
        assert detok.text == full[:full.index(stop)]
        for emitted in texts:
            assert detok.text.startswith(emitted)  # never emitted anything it had to take back
            assert stop not in emitted
        # The stop string spans several tokens; while its first ones arrived, its text was held.
        before, ends = full.index(stop), [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
        spanned = [k for k, end in enumerate(ends) if before < end < before + len(stop)]
        assert len(spanned) >= 1
        assert all(texts[k] == full[:before] for k in spanned)
        assert pieces[-1] == ""  # finish() after a stop has nothing to add


def test_stop_string_inside_multibyte_tokens(tok):
    ids = tok.encode(TEXTS["chinese"])
    _, texts, detok = run(tok, ids, stop=["天气"])
    assert detok.stop_matched == "天气"
    assert detok.text == "你好，世界！今天"
    assert all("\ufffd" not in t for t in texts)


def test_stop_at_the_very_start(tok):
    pieces, _, detok = run(tok, tok.encode("Hello world"), stop=["Hello"])
    assert detok.stop_matched == "Hello"
    assert pieces == ["", "", ""]
    assert detok.text == ""


@pytest.mark.parametrize("stops", [["Hello world", "lo"], ["lo", "Hello world"]])
def test_shorter_stop_string_completing_first_wins(tok, stops):
    _, _, detok = run(tok, tok.encode("Hello world"), stop=stops)
    assert detok.stop_matched == "lo"
    assert detok.text == "Hel"


def test_stop_strings_completing_first_inside_one_token(tok):
    ids = tok.encode("Hello world")
    assert [tok.token_bytes(i) for i in ids] == [b"Hello", b" world"]
    _, _, detok = run(tok, ids, stop=["world", "wor"])
    assert (detok.stop_matched, detok.text) == ("wor", "Hello ")


def test_stop_string_in_the_middle_of_a_token_drops_the_rest(tok):
    ids = tok.encode("Hello world again")
    assert tok.token_bytes(ids[1]) == b" world"
    pieces, _, detok = run(tok, ids, stop=["orl"])
    assert pieces == ["Hell", "o w", "", ""]  # "o" may start "orl"; "d" and all after it is dropped
    assert detok.stop_matched == "orl"
    _, _, detok = run(tok, ids, stop=["orl"], include_stop_str_in_output=True)
    assert detok.text == "Hello worl"


def test_include_stop_str_in_output(tok):
    ids = tok.encode("Say it: the end. After that nothing.")
    _, texts, detok = run(tok, ids, stop=["the end."], include_stop_str_in_output=True)
    assert detok.stop_matched == "the end."
    assert detok.text == "Say it: the end."
    assert all(detok.text.startswith(t) for t in texts)


def test_near_miss_releases_held_text(tok):
    ids = ids_of(tok, "Hel", "lo there")
    pieces, _, detok = run(tok, ids, stop=["Help"])
    assert pieces[0] == ""  # "Hel" might start "Help"
    assert pieces[1].startswith("Hel")
    assert detok.text == "Hello there"
    assert detok.stop_matched is None


def test_later_adds_after_a_stop_return_nothing(tok):
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=["world"]))
    assert [detok.add(i) for i in tok.encode("Hello world and more")] == ["Hello", " ", "", ""]
    assert detok.finish() == ""
    assert detok.text == "Hello "


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tok, skip):
    ids = ids_of(tok, "Hi") + [IM_END] + ids_of(tok, " there") + [IM_END]
    _, _, detok = run(tok, ids, skip_special_tokens=skip)
    assert detok.text == tok.decode(ids, skip_special_tokens=skip)
    assert detok.text == ("Hi there" if skip else "Hi<|im_end|> there<|im_end|>")


def test_special_token_can_be_a_stop_string_when_kept(tok):
    ids = ids_of(tok, "Hi") + [IM_END] + ids_of(tok, " there")
    _, _, detok = run(tok, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert (detok.stop_matched, detok.text) == ("<|im_end|>", "Hi")


def test_finish_releases_held_stop_prefix(tok):
    pieces, _, detok = run(tok, tok.encode("Hello world"), stop=["world peace"])
    assert pieces == ["Hello", " ", "world"]  # "world" held until finish()
    assert detok.stop_matched is None
    assert detok.text == "Hello world"


def test_finish_releases_incomplete_utf8_sequence(tok):
    ids = tok.encode("好")
    assert len(ids) == 2
    pieces, _, detok = run(tok, ids[:1])
    assert pieces == ["", "\ufffd"]  # finish() decodes the cut character with errors="replace"
    assert detok.text == tok.decode(ids[:1])


def test_finish_releases_stop_prefix_and_incomplete_sequence(tok):
    ids = tok.encode("ab 好")
    _, _, detok = run(tok, ids[:-1], stop=["b 好!"])
    assert detok.text == tok.decode(ids[:-1]) == "ab \ufffd"
    assert detok.stop_matched is None


def test_random_stop_strings_match_a_reference(tok):
    """The result equals cutting the full text at the stop string that completes first."""
    rng = random.Random(0)
    text = " ".join(TEXTS.values())
    ids = tok.encode(text)
    full = tok.decode(ids)
    for _ in range(200):
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(full))
            stops.append(full[start:start + rng.randint(1, 6)])
        include = rng.random() < 0.5
        _, texts, detok = run(tok, ids, stop=stops, include_stop_str_in_output=include)
        end, start, stop = min((full.find(s) + len(s), full.find(s), s) for s in stops)
        assert detok.stop_matched == stop
        assert detok.text == full[:end if include else start]
        assert all(detok.text.startswith(t) and "\ufffd" not in t for t in texts)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_join_to_decode(tok, skip):
    """Even arbitrary ids (invalid UTF-8, specials anywhere) stream to exactly what decode() gives."""
    rng = random.Random(1)
    num_specials = len(tok.special_ids)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.8 else rng.randrange(num_specials)
               for _ in range(rng.randint(1, 30))]
        _, _, detok = run(tok, ids, skip_special_tokens=skip)
        assert detok.text == tok.decode(ids, skip_special_tokens=skip)
