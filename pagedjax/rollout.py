"""`pagedjax.rollout`: sampled completions as arrays, what a GRPO / PPO loss reads.

One call samples every prompt (n rows each with `SamplingParams.n`) and returns padded
numpy arrays of the completion tokens, a mask, and each sampled token's logprob as the
engine computed it (in the engine's `logprobs_mode`), so a training step never loops over
`RequestOutput`s. `Rollout.forward_inputs()` lays the rows out for `pagedjax.forward`, and
`completion_logprobs(logits, rollout.completion_ids)` reads the trainer's logprobs of the
same tokens in the same [N, G] frame.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models import ModelConfig, exact_numerics

from .api import EngineCache, resolve_llm
from .llm import LLM
from .sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True, eq=False)
class Rollout:
    """N sampled rows (prompt i's n rows adjacent, in completion order) as arrays padded
    to G, the longest completion. `completion_logprobs` are in `logprobs_mode` (the
    engine's; 0 on padding); `prompt_ids` holds each prompt's token ids, `prompt_index`
    maps rows to them; `finish_reason` is "stop" or "length" per row; `texts` the
    completions' text."""

    completion_ids: np.ndarray  # [N, G] int32, 0 on padding
    completion_mask: np.ndarray  # [N, G] bool, True on generated tokens
    completion_logprobs: np.ndarray  # [N, G] float32
    prompt_index: np.ndarray  # [N] int32
    finish_reason: np.ndarray  # [N] str
    prompt_ids: list  # per prompt: list of token ids
    texts: list  # [N] str
    logprobs_mode: str = "raw_logprobs"

    def __post_init__(self):
        rows, width = self.completion_ids.shape
        for name in ("completion_mask", "completion_logprobs"):
            if getattr(self, name).shape != (rows, width):
                raise ValueError(f"{name} must have shape {(rows, width)}, "
                                 f"got {getattr(self, name).shape}")
        for name in ("prompt_index", "finish_reason", "texts"):
            if len(getattr(self, name)) != rows:
                raise ValueError(f"{name} must have {rows} entries, got "
                                 f"{len(getattr(self, name))}")
        if rows and not 0 <= self.prompt_index.min() <= self.prompt_index.max() < len(
                self.prompt_ids):
            raise ValueError("prompt_index must index prompt_ids")

    @property
    def lengths(self) -> np.ndarray:  # [N] int32
        """Tokens generated in each row."""
        return self.completion_mask.sum(axis=1, dtype=np.int32)

    def forward_inputs(self, pad_id: int = 0) -> dict[str, np.ndarray]:
        """Each row's prompt + completion for `pagedjax.forward(params, config, **inputs)`:
        `token_ids` [N, W + G] with prompts left-padded to the longest one (W) and
        completions right-padded to G, so the completions sit in the last G columns;
        `segment_ids` [N, W + G], 1 on the row's tokens and 0 on padding (so the real
        tokens' positions start at 0)."""
        prompts = [self.prompt_ids[i] for i in self.prompt_index]
        prompt_width = max((len(p) for p in prompts), default=0)
        rows, gen_width = self.completion_ids.shape
        token_ids = np.full((rows, prompt_width + gen_width), pad_id, np.int32)
        segment_ids = np.zeros((rows, prompt_width + gen_width), np.int32)
        for row, prompt in enumerate(prompts):
            start = prompt_width - len(prompt)
            token_ids[row, start:prompt_width] = prompt
            segment_ids[row, start:prompt_width] = 1
        token_ids[:, prompt_width:] = np.where(self.completion_mask, self.completion_ids,
                                               pad_id)
        segment_ids[:, prompt_width:] = self.completion_mask
        return {"token_ids": token_ids, "segment_ids": segment_ids}


def completion_logprobs(logits: jax.Array, completion_ids: jax.Array,
                        exact: bool = False) -> jax.Array:
    """float32 logprobs [N, G] of completion_ids [N, G] under logits [N, S, V] of rows
    whose last G tokens are the completions (`Rollout.forward_inputs`): the logits one
    position before each token give its distribution (G = S - 1: every next token's).
    Differentiable and jit-able. `exact`: the float64 log_softmax rounded once, as an
    engine with attention_backend="exact" computes its logprobs."""
    gen_width = completion_ids.shape[1]
    seq_len = logits.shape[1]
    before = logits[:, seq_len - gen_width - 1: seq_len - 1].astype(jnp.float32)  # [N, G, V]
    logprobs = (exact_numerics.log_softmax(before) if exact
                else jax.nn.log_softmax(before, axis=-1))
    return jnp.take_along_axis(logprobs, completion_ids[..., None].astype(jnp.int32),
                               axis=-1)[..., 0]


def rollout(model: Union[None, str, LLM, Any], prompt_token_ids: Sequence[Sequence[int]],
            sampling_params: Union[SamplingParams, Sequence[SamplingParams]], *,
            config: Optional[ModelConfig] = None, tokenizer: Any = None,
            cache: Optional[EngineCache] = None, **engine_kwargs) -> Rollout:
    """Sample completions of token-id prompts as a `Rollout` of padded arrays.

    `model` is what `pagedjax.generate` accepts (None, a path, an LLM, or a params
    pytree with `config=` and `tokenizer=`; engines for pytrees are kept in `cache` and
    take new weights without recompiling). `sampling_params` is one SamplingParams for
    every prompt or one per prompt; the sampled tokens' logprobs are returned whether or
    not `logprobs` is set. Extra keyword arguments configure a newly built engine (e.g.
    `logprobs_mode="processed_logprobs"`, `max_num_batched_tokens`;
    `attention_backend="exact"` for logprobs equal to `pagedjax.forward(..., exact=True)`'s
    to the bit).
    """
    llm = resolve_llm(model, config, tokenizer, cache, engine_kwargs)
    prompts = _token_lists(prompt_token_ids)
    if isinstance(sampling_params, SamplingParams):
        sampling_params = [sampling_params] * len(prompts)
    sampling_params = list(sampling_params)
    if len(sampling_params) != len(prompts) or not all(
            isinstance(p, SamplingParams) for p in sampling_params):
        raise ValueError("sampling_params must be a SamplingParams or one per prompt")
    # logprobs=0: the sampled token's logprob only, computed in the same step program.
    sampling_params = [p if p.logprobs is not None else dataclasses.replace(p, logprobs=0)
                       for p in sampling_params]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], sampling_params,
                           use_tqdm=False)
    rows = [(output.prompt_index, completion) for output in outputs
            for completion in sorted(output.outputs, key=lambda c: c.index)]
    width = max((len(c.token_ids) for _, c in rows), default=0)
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    logprobs = np.zeros((len(rows), width), np.float32)
    for row, (_, completion) in enumerate(rows):
        tokens = completion.token_ids
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = True
        logprobs[row, :len(tokens)] = [entry[token].logprob
                                       for token, entry in zip(tokens, completion.logprobs)]
    return Rollout(
        completion_ids=ids, completion_mask=mask, completion_logprobs=logprobs,
        prompt_index=np.array([index for index, _ in rows], np.int32),
        finish_reason=np.array([c.finish_reason for _, c in rows], dtype=str),
        prompt_ids=prompts, texts=[c.text for _, c in rows],
        logprobs_mode=llm.engine.config.logprobs_mode)


def _token_lists(prompt_token_ids: Any) -> list[list[int]]:
    """Prompts as lists of Python ints (rows of an array or lists of ints)."""
    if isinstance(prompt_token_ids, (str, bytes)) or not len(prompt_token_ids):
        raise ValueError("prompt_token_ids must be a non-empty list of token-id lists")
    prompts = []
    for prompt in prompt_token_ids:
        if isinstance(prompt, (str, bytes, int, np.integer)):
            raise ValueError("prompt_token_ids must be a list of token-id lists, got an "
                             f"entry {prompt!r}")
        tokens = np.asarray(prompt)
        if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
            raise ValueError(f"prompt_token_ids entries must be lists of ints, got {prompt!r}")
        prompts.append(tokens.tolist())
    return prompts
