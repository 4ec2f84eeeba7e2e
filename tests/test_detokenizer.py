"""Incremental detokenization against the real SmolLM2 tokenizer (byte-level BPE, whose
byte tokens split multi-byte characters)."""

import numpy as np
import pytest

from pagedjax.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Héllo wörld 🤗🎉 日本語のテキスト café naïve",
    "Emoji only: 👩‍👩‍👧‍👦🧑🏽‍🚀🦄",
    "中文测试，한국어 텍스트, Ελληνικά, العربية",
    "Ça coûte 5 € — déjà vu. Zürich, São Paulo, Þórr",
]


@pytest.fixture(scope="module")
def tokenizer():
    from gguf import GGUFReader

    from pagedjax.loading import default_gguf_path
    from pagedjax.loading.gguf_loader import read_metadata
    from pagedjax.loading.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(read_metadata(GGUFReader(default_gguf_path())))


def detokenize(tokenizer, prompt_ids, ids, skip_special_tokens=True):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = [detokenizer.add(token) for token in ids]
    return deltas, detokenizer.flush()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Say something:", "日本"])
def test_deltas_concatenate_to_decode_without_broken_chars(tokenizer, text, prompt):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The test only means something if some token holds part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else [1]
    deltas, rest = detokenize(tokenizer, prompt_ids, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert rest == ""
    assert not any("\ufffd" in delta for delta in deltas)


def test_split_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode(" 🤗", add_special_tokens=False)
    assert len(ids) >= 2  # byte tokens
    deltas, _ = detokenize(tokenizer, [1], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == " 🤗"


def test_each_delta_is_the_new_text(tokenizer):
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    deltas, _ = detokenize(tokenizer, [1], ids)
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k])
        if not prefix.endswith("\ufffd"):
            assert "".join(deltas[:k]) == prefix


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Hi 🤗", add_special_tokens=False) + [end]
    ids += tokenizer.encode(" there", add_special_tokens=False)
    deltas, rest = detokenize(tokenizer, [1], ids, skip_special_tokens=skip)
    text = "".join(deltas) + rest
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is (not skip)


def test_random_token_streams_match_decode(tokenizer):
    # Random ids (many byte tokens, specials, invalid byte runs): deltas plus the final
    # flush always equal one decode of all the ids.
    rng = np.random.default_rng(0)
    vocab = tokenizer.vocab_size
    for _ in range(300):
        prompt = rng.integers(0, vocab, size=rng.integers(1, 8)).tolist()
        pools = [rng.integers(0, vocab, size=20), rng.integers(100, 400, size=20),
                 rng.integers(0, 20, size=20)]
        ids = [int(rng.choice(pools[rng.integers(3)])) for _ in range(rng.integers(1, 20))]
        for skip in (True, False):
            deltas, rest = detokenize(tokenizer, prompt, ids, skip)
            assert "".join(deltas) + rest == tokenizer.decode(ids, skip_special_tokens=skip)


class PythonOnly:
    """The tokenizer without its library decode stream: IncrementalDetokenizer's Python
    version of the algorithm runs."""

    def __init__(self, tokenizer, fail_after=None):
        self._tokenizer, self._fail_after = tokenizer, fail_after
        self.decode = tokenizer.decode

    def decode_stream(self, context, skip_special_tokens):  # only with fail_after
        if self._fail_after is None:
            return None
        step, calls = self._tokenizer.decode_stream(context, skip_special_tokens), [0]

        def failing_step(token_id):
            calls[0] += 1
            if calls[0] > self._fail_after:
                raise Exception("InvalidPrefix")
            return step(token_id)
        return failing_step


def test_library_stream_gives_the_python_versions_deltas(tokenizer):
    assert tokenizer.decode_stream([1], True) is not None  # the fast path is what runs
    rng = np.random.default_rng(1)
    vocab = tokenizer.vocab_size
    for trial in range(200):
        prompt = rng.integers(0, vocab, size=rng.integers(1, 8)).tolist()
        ids = rng.integers(0, 400 if trial % 2 else vocab, size=rng.integers(1, 30)).tolist()
        for skip in (True, False):
            expected = detokenize(PythonOnly(tokenizer), prompt, ids, skip)
            assert detokenize(tokenizer, prompt, ids, skip) == expected
            # a stream that fails part-way hands over to the Python version seamlessly
            failing = PythonOnly(tokenizer, fail_after=len(ids) // 2)
            assert detokenize(failing, prompt, ids, skip) == expected
