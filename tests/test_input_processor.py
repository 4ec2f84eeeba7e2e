"""InputProcessor: a prompt is validated once, when its Request is built (no model)."""

import pytest

from pagedjax.input_processor import InputProcessor
from pagedjax.sampling_params import SamplingParams


def make_processor(max_model_len=16):
    return InputProcessor(vocab_size=100, max_model_len=max_model_len, max_num_seqs=8,
                          eos_token_ids=frozenset({2}))


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt.*empty"):
        make_processor().make_request([], SamplingParams())


@pytest.mark.parametrize("prompt_len", [16, 17, 100])
def test_prompt_too_long_for_max_model_len_is_rejected(prompt_len):
    with pytest.raises(ValueError, match=r"max_model_len is 16") as info:
        make_processor().make_request([5] * prompt_len, SamplingParams())
    assert str(prompt_len) in str(info.value)


def test_token_ids_outside_the_vocabulary_and_text_without_tokenizer_are_rejected():
    processor = make_processor()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        processor.make_request([5, 100], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        processor.make_requests("text needs a tokenizer", None)
    with pytest.raises(ValueError, match="stop"):
        processor.make_request([5], SamplingParams(stop=["x"]))


def test_n_sequences_get_children_with_their_own_seeds():
    request = make_processor().make_request([5, 6], SamplingParams(n=3, seed=7))
    assert [s.child_index for s in request.sequences] == [0, 1, 2]
    assert len({s.seed for s in request.sequences}) == 3
    assert request.pending_children == request.sequences[1:]
    with pytest.raises(ValueError, match="n: 9"):
        make_processor().make_request([5], SamplingParams(n=9))


def test_top_k_and_token_ids_are_checked_against_the_vocabulary():
    processor = make_processor()  # vocabulary of 100
    assert processor.make_request([5], SamplingParams(top_k=100)).sampling_params.top_k == 100
    for params, field in [(SamplingParams(top_k=101), "top_k"),
                          (SamplingParams(stop_token_ids=[100]), "stop_token_ids"),
                          (SamplingParams(logit_bias={100: 1.0}), "logit_bias")]:
        with pytest.raises(ValueError, match=field):
            processor.make_request([5], params)
