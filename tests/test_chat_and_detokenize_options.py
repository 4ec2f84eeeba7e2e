"""LLM.chat options (chat_template, continue_final_message) and the detokenization options
skip_special_tokens / spaces_between_special_tokens, on the tiny model."""

import pytest
from transformers import AutoTokenizer

from pagedjax import SamplingParams

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat is"},
    {"role": "assistant", "content": "on the mat and"},
]
GREEDY = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_continue_final_message_matches_transformers(llm, hf_tokenizer):
    expected = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False,
                                                continue_final_message=True)
    assert expected.endswith("on the mat and")  # left open: no <|im_end|>
    out = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)
    assert out[0].prompt == expected
    assert out[0].prompt_token_ids == hf_tokenizer.encode(expected, add_special_tokens=False)
    # A trailing space the template keeps is kept too (transformers' tag rule).
    spaced = CONVERSATION[:-1] + [{"role": "assistant", "content": "on the "}]
    out = llm.chat(spaced, GREEDY, use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)
    assert out[0].prompt == hf_tokenizer.apply_chat_template(
        spaced, tokenize=False, continue_final_message=True)
    # Without it, the last message is closed and a generation prompt follows.
    out = llm.chat(CONVERSATION[:2], GREEDY, use_tqdm=False)
    assert out[0].prompt == hf_tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True)


def test_continue_final_message_excludes_generation_prompt(llm):
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(CONVERSATION, GREEDY, use_tqdm=False, continue_final_message=True)


def test_chat_template_override(llm, hf_tokenizer):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    out = llm.chat(CONVERSATION[:2], GREEDY, use_tqdm=False, chat_template=template)
    assert out[0].prompt == "[system] be brief\n[user] the cat is\n[assistant] "
    assert out[0].prompt == hf_tokenizer.apply_chat_template(
        CONVERSATION[:2], tokenize=False, add_generation_prompt=True, chat_template=template)
    out = llm.chat(CONVERSATION, GREEDY, use_tqdm=False, chat_template=template,
                   add_generation_prompt=False, continue_final_message=True)
    assert out[0].prompt == "[system] be brief\n[user] the cat is\n[assistant] on the mat and"


def test_chat_without_any_template_is_a_clear_error(llm):
    tokenizer = llm.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            llm.chat(CONVERSATION[:2], GREEDY, use_tqdm=False)
        # A template given explicitly still works.
        out = llm.chat(CONVERSATION[:2], GREEDY, use_tqdm=False,
                       chat_template="{{ messages[-1]['content'] }}")
        assert out[0].prompt == "the cat is"
    finally:
        tokenizer.chat_template = saved


# ---- skip_special_tokens / spaces_between_special_tokens ------------------------------

A, B = 3 + ord("a"), 3 + ord("b")  # byte tokens follow the special ids 0..2
SPECIAL = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def test_tokenizer_decode_spaces_between_special_tokens(llm):
    tok = llm.get_tokenizer()
    ids = [A, 1, B, 2, 2, A, B]
    assert tok.decode(ids) == "abab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_start|>b<|im_end|><|im_end|>ab"
    assert (tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=True)
            == "a <|im_start|> b <|im_end|> <|im_end|> ab")
    # Skipping special tokens: the option changes nothing.
    assert tok.decode(ids, spaces_between_special_tokens=True) == "abab"


def _expected_text(tok, prompt, output, **kw):
    context = prompt[-5:]  # the detokenizer's prompt context (vLLM's)
    return tok.decode(context + output, **kw)[len(tok.decode(context, **kw)):]


@pytest.mark.parametrize("skip,spaces", [(True, True), (False, False), (False, True)])
def test_special_tokens_in_generated_text(llm, skip, spaces):
    tok = llm.get_tokenizer()
    prompt = [A, B, A, B, A, B]
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True,
                            allowed_token_ids=[0, 1, 2, A, B], skip_special_tokens=skip,
                            spaces_between_special_tokens=spaces)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    ids = out.token_ids
    assert set(ids) & {0, 1, 2} and set(ids) & {A, B}  # both kinds were generated
    text = out.text
    if skip:
        assert text == tok.decode(ids) and not any(s in text for s in SPECIAL)
        return
    assert any(s in text for s in SPECIAL)
    assert text == _expected_text(tok, prompt, ids, skip_special_tokens=False,
                                  spaces_between_special_tokens=spaces)
    plain = tok.decode(ids, skip_special_tokens=False)
    if spaces:
        assert text != plain and text.split() == plain_split(plain)
    else:
        assert text == plain


def plain_split(text):
    """Special-token text and the runs between them, as words."""
    for s in SPECIAL:
        text = text.replace(s, f" {s} ")
    return text.split()


@pytest.mark.parametrize("value", [0, "no", None])
def test_spaces_between_special_tokens_validation(value):
    with pytest.raises(ValueError, match="spaces_between_special_tokens"):
        SamplingParams(spaces_between_special_tokens=value)
