"""LLM: the offline batched API (vLLM's `LLM(...).generate(...)`)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional, Sequence, Union

from pagedjax.models import SUPPORTED_ARCHITECTURES, ModelConfig

from .config import EngineConfig
from .engine import Engine, KVCacheStats
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .progress import GenerateProgress
from .request import Request
from .sampling_params import SamplingParams

PromptType = Union[str, dict, Sequence[int]]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    `model` is a local directory (HF config.json + safetensors + tokenizer), a .gguf file,
    a hub id found in the local HF cache, or None for the default SmolLM2-135M-Instruct
    GGUF. Use `LLM.from_params` to serve weights that already live in memory.
    """

    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto",
                 max_model_len: Optional[int] = None, block_size: int = 16,
                 num_blocks: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512, seed: int = 0,
                 kv_cache_memory_bytes: int = 1 << 30, kv_cache_memory_fraction: float = 0.9,
                 attention_backend: str = "auto", tokenizer: Any = None,
                 _loaded: Optional[tuple] = None):
        engine_config = EngineConfig(
            dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            attention_backend=attention_backend)
        if _loaded is None:
            from .loading import load_model  # pulls in gguf/safetensors only when loading

            model_config, params, loaded_tokenizer = load_model(
                model, supported_architectures=SUPPORTED_ARCHITECTURES)
        else:
            model_config, params, loaded_tokenizer = _loaded
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if self.tokenizer is None:
            raise ValueError("tokenizer: none was given and the model has none")
        self.engine = Engine(model_config, params, self.tokenizer.eos_token_ids, engine_config,
                             tokenizer=self.tokenizer)

    @classmethod
    def from_params(cls, params: Any, config: ModelConfig, tokenizer: Any,
                    **engine_kwargs) -> "LLM":
        """Serve an in-memory params pytree (e.g. from a training run) with its config."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        return cls(None, tokenizer=tokenizer, _loaded=(config, params, tokenizer),
                   **engine_kwargs)

    # ---- generation ----------------------------------------------------------------

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order prompts were given.

        A prompt is a string, `{"prompt": str}`, or `{"prompt_token_ids": [ints]}` (a
        list of ints alone is taken as token ids too). Every prompt and sampling params
        object is validated before any request starts, so one bad prompt rejects the
        call with a ValueError and leaves the engine as it was.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        requests = [self._make_request(p, sp) for p, sp in zip(prompt_list, params_list)]
        return self._run(requests, use_tqdm)

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the chat template."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt": self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template),
             "add_special_tokens": False}
            for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _make_request(self, prompt: PromptType, params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, token_ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            elif "prompt" in prompt and isinstance(prompt["prompt"], str):
                text = prompt["prompt"]
                token_ids = self.tokenizer.encode(
                    text, add_special_tokens=prompt.get("add_special_tokens", True))
            else:
                raise ValueError("prompt: a dict prompt needs 'prompt' (str) or "
                                 "'prompt_token_ids' (list of ints)")
        else:
            text, token_ids = None, prompt
        return self.engine.make_request(token_ids, params, prompt=text)

    def _run(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        for request in requests:
            engine.add_request(request)
        progress = GenerateProgress(len(requests), enabled=use_tqdm)
        pending = {r.request_id for r in requests}
        try:
            while pending:
                for finished in engine.step():
                    if finished.request_id in pending:
                        pending.discard(finished.request_id)
                        progress.update(finished)
        finally:
            progress.close()
            for request_id in pending:  # interrupted: leave no request behind
                engine.abort_request(request_id)
        return [self._to_output(r) for r in requests]

    def _to_output(self, request: Request) -> RequestOutput:
        completion = CompletionOutput(index=0, text=request.output_text,
                                      token_ids=list(request.output_token_ids),
                                      finish_reason=request.finish_reason,
                                      stop_reason=request.stop_reason)
        metrics = RequestMetrics(arrival_time=request.arrival_time,
                                 first_scheduled_time=request.first_scheduled_time,
                                 first_token_time=request.first_token_time,
                                 finished_time=request.finished_time,
                                 num_preemptions=request.num_preemptions)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=list(request.prompt_token_ids),
                             outputs=[completion], finished=request.is_finished,
                             metrics=metrics)

    # ---- engine controls -----------------------------------------------------------

    def warmup(self) -> float:
        """Compile every bucket shape now; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.warmup()
        return time.perf_counter() - start

    def update_params(self, params: Any) -> None:
        """Use new weights of the same shapes (e.g. the latest training step); no recompile."""
        self.engine.set_params(params)

    def get_tokenizer(self):
        """The tokenizer prompts are encoded with."""
        return self.tokenizer

    @property
    def num_compiles(self) -> int:
        """Step programs compiled so far (bounded by the bucket set)."""
        return self.engine.num_compiles

    def kv_cache_stats(self) -> KVCacheStats:
        """KV pool size, usage and block-tail waste right now."""
        return self.engine.kv_cache_stats()


def _as_prompt_list(prompts: Any) -> list:
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


def _as_params_list(sampling_params: Any, count: int) -> list[SamplingParams]:
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
