"""`pagedjax.generate`: one call from research code or a notebook to text.

It accepts a model path (or None for the default model), an `LLM`, or a params pytree
with its `ModelConfig` and tokenizer (weights straight from a training run). Engines built
for params pytrees are kept in an `EngineCache` keyed by config, tokenizer and engine
options, so calling again with new weights of the same shapes swaps them in and never
recompiles. Pass your own `cache=EngineCache()` to control its lifetime, or call
`clear_engine_cache()` to free the default one.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from pagedjax.models import ModelConfig

from .flax_params import params_from_flax
from .llm import LLM
from .sampling_params import SamplingParams


class EngineCache:
    """Keeps the most recent LLMs built by `generate` for in-memory params."""

    def __init__(self, max_entries: int = 1):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: dict[Any, LLM] = {}

    def get_or_build(self, key: Any, build) -> LLM:
        """The LLM cached under `key`, built with `build()` on a miss (oldest evicted)."""
        if key in self._entries:
            llm = self._entries.pop(key)
        else:
            llm = build()
            while len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = llm  # most recent last
        return llm

    def clear(self) -> None:
        """Drop every cached engine (and its KV pool)."""
        self._entries.clear()


_DEFAULT_CACHE = EngineCache()


def clear_engine_cache() -> None:
    """Free the engines `generate` keeps for params pytrees."""
    _DEFAULT_CACHE.clear()


def generate(model: Union[None, str, LLM, Any], prompts: Union[str, Sequence[Any]], *,
             config: Optional[ModelConfig] = None, tokenizer: Any = None,
             sampling_params: Optional[SamplingParams] = None, max_tokens: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: Optional[int] = None, use_tqdm: bool = False,
             cache: Optional[EngineCache] = None, **engine_kwargs) -> list[str]:
    """Generate a completion text for each prompt (greedy unless `temperature` > 0).

    model: None (default model), a path / hub id, an `LLM`, or a params pytree — the
    latter needs `config=` (ModelConfig) and `tokenizer=`; linen `{"params": ...}` and
    NNX states are unwrapped (`params_from_flax`). `sampling_params` overrides
    the max_tokens / temperature / top_p / top_k / seed shortcuts. Extra keyword
    arguments configure a newly built engine (e.g. max_model_len, num_blocks).
    """
    if sampling_params is None:
        sampling_params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                         top_p=top_p, top_k=top_k, seed=seed)
    llm = resolve_llm(model, config, tokenizer, cache, engine_kwargs)
    outputs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    return [output.outputs[0].text for output in outputs]


def resolve_llm(model: Union[None, str, LLM, Any], config: Optional[ModelConfig],
                tokenizer: Any, cache: Optional[EngineCache], engine_kwargs: dict) -> LLM:
    """The LLM that `generate` and `rollout` run `model` on: an LLM as it is, a path (or
    None) loaded, a params pytree on an engine from `cache` (default: the module's) with
    these weights swapped in, or built on a miss."""
    cache = cache or _DEFAULT_CACHE
    if isinstance(model, LLM):
        if engine_kwargs:
            raise ValueError(f"engine options {sorted(engine_kwargs)} can't change an existing "
                             f"LLM; build a new one")
        return model
    if model is None or isinstance(model, str):
        return LLM(model, **engine_kwargs)
    try:
        model = params_from_flax(model)  # linen {"params": ...}, nnx.State, ...
    except ValueError:
        raise ValueError(f"model must be None, a path, an LLM or a params pytree, got "
                         f"{type(model).__name__}") from None
    if config is None or tokenizer is None:
        raise ValueError("config and tokenizer are required when model is a params pytree")
    key = (config, id(tokenizer), tuple(sorted(engine_kwargs.items())))
    built = []

    def build() -> LLM:
        built.append(True)
        return LLM.from_params(model, config, tokenizer, **engine_kwargs)

    llm = cache.get_or_build(key, build)
    if not built:
        llm.update_params(model)
    return llm
