"""Input processing: prompts and SamplingParams in, validated `Request`s out (not queued).

Everything about a request that can be wrong is checked here, once, before it reaches the
scheduler: token ids inside the vocabulary, a prompt that leaves room under
max_model_len, sampling options against this model, stop strings needing a tokenizer.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .detokenizer import IncrementalDetokenizer
from .parallel_sampling import child_seed
from .request import Request
from .sampling_params import SamplingParams
from .structured_outputs import GrammarCompiler

PromptType = Union[str, dict, Sequence[int]]


class InputProcessor:
    """Builds Requests for one model: its vocabulary, context limit, EOS ids, tokenizer."""

    def __init__(self, *, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 eos_token_ids: frozenset[int], tokenizer: Any = None, seed: int = 0):
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = tokenizer  # None: no output text (and no stop strings)
        self.seed = seed
        self._request_counter = itertools.count()
        self.grammars = GrammarCompiler(tokenizer, vocab_size, self.eos_token_ids)

    def make_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                     prompt: Optional[str] = None,
                     request_id: Optional[str] = None) -> Request:
        """Validate a tokenized prompt and build its Request.  Raises ValueError."""
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(
                f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        token_ids = validate_token_ids(prompt_token_ids, self.vocab_size)
        if not token_ids:
            raise ValueError("prompt: the prompt is empty (it has no tokens)")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: the prompt has {len(token_ids)} tokens, but max_model_len is "
                f"{self.max_model_len} (it must leave room for at least one new token)")
        if sampling_params.top_k > self.vocab_size:
            raise ValueError(f"top_k: {sampling_params.top_k} is larger than the vocabulary "
                             f"({self.vocab_size} tokens); use -1 or 0 to turn top-k off")
        bad_words_ids = sampling_params.check_token_ids(self.vocab_size, self.tokenizer)
        if sampling_params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this engine has none")
        if sampling_params.n > self.max_num_seqs:
            raise ValueError(f"n: {sampling_params.n} parallel sequences exceed max_num_seqs="
                             f"{self.max_num_seqs}")
        grammar = None
        if sampling_params.structured_outputs is not None:
            grammar = self.grammars.state_for(sampling_params.structured_outputs)
        index = next(self._request_counter)
        seed = sampling_params.seed
        if seed is None:
            seed = int(np.random.SeedSequence([self.seed, index]).generate_state(
                1, np.uint64)[0]) >> 1
        request = Request(request_id=request_id or str(index), prompt_token_ids=token_ids,
                          sampling_params=sampling_params, seed=seed,
                          eos_token_ids=self.eos_token_ids, prompt=prompt)
        request.bad_words_token_ids = bad_words_ids
        request.detokenizer = self._detokenizer(request)
        request.grammar = grammar
        if sampling_params.n > 1:
            self._add_parallel_children(request, seed)
        return request

    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], Any]:
        """(text, token ids) of a prompt: a string, `{"prompt": str}` (with an optional
        "add_special_tokens"), `{"prompt_token_ids": [...]}` or a list of token ids."""
        if isinstance(prompt, str):
            return prompt, self._encode(prompt, True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), prompt["prompt_token_ids"]
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                text = prompt["prompt"]
                return text, self._encode(text, prompt.get("add_special_tokens", True))
            raise ValueError("prompt: a dict prompt needs 'prompt' (str) or "
                             "'prompt_token_ids' (list of ints)")
        return None, prompt

    def make_requests(self, prompts: Any, sampling_params: Any) -> list[Request]:
        """Requests for one prompt or a list of them, with one SamplingParams for all, one
        per prompt, or None (defaults). Every prompt is checked before any is returned."""
        prompt_list = as_prompt_list(prompts)
        params_list = as_params_list(sampling_params, len(prompt_list))
        requests = []
        for prompt, params in zip(prompt_list, params_list):
            text, token_ids = self.tokenize(prompt)
            requests.append(self.make_request(token_ids, params, prompt=text))
        return requests

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("prompt: a text prompt needs a tokenizer; give token ids")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _detokenizer(self, request: Request) -> Optional[IncrementalDetokenizer]:
        if self.tokenizer is None:
            return None
        params = request.sampling_params
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                      params.skip_special_tokens,
                                      params.spaces_between_special_tokens)

    def _add_parallel_children(self, parent: Request, seed: int) -> None:
        """Give an n > 1 request its n - 1 children (forked once its prompt is prefilled);
        sequence i samples with child_seed(seed, i) and child i has id f"{i}_{parent id}"."""
        parent.seed = child_seed(seed, 0)
        parent.sequences = [parent]
        for i in range(1, parent.sampling_params.n):
            child = dataclasses.replace(
                parent, request_id=f"{i}_{parent.request_id}", seed=child_seed(seed, i),
                prompt_token_ids=list(parent.prompt_token_ids), output_token_ids=[],
                block_ids=[], child_index=i, sequences=[], pending_children=[],
                block_hashes=[],
                grammar=parent.grammar.fork() if parent.grammar is not None else None)
            child.detokenizer = self._detokenizer(child)
            parent.sequences.append(child)
            parent.pending_children.append(child)


def validate_token_ids(token_ids: Any, vocab_size: int) -> list[int]:
    """`token_ids` as a list of ints inside [0, vocab_size); ValueError otherwise."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of ints, got {type(token_ids).__name__}")
    ids = list(token_ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise ValueError(f"prompt_token_ids must hold ints, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt_token_ids: token id {token} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def as_prompt_list(prompts: Any) -> list:
    """One prompt or a list of prompts as a list (a list of ints is one tokenized prompt)."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts: the list of prompts is empty")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one tokenized prompt
        return list(prompts)
    raise ValueError(f"prompts must be a string, a dict or a list of them, got "
                     f"{type(prompts).__name__}")


def as_params_list(sampling_params: Any, count: int) -> list[SamplingParams]:
    """`count` SamplingParams from None, one SamplingParams, or a list of `count`."""
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if isinstance(sampling_params, Iterable):
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"sampling_params: got {len(params)} for {count} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must hold SamplingParams, got {p!r}")
        return params
    raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got "
                     f"{type(sampling_params).__name__}")
