"""LLM: the offline batched API (vLLM's `LLM(...).generate(...)`)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence, Union

from pagedjax.models import SUPPORTED_ARCHITECTURES, ModelConfig

from .config import EngineConfig
from .engine import Engine, KVCacheStats
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .progress import GenerateProgress
from .request import Request
from .sampling_params import SamplingParams

PromptType = Union[str, dict, Sequence[int]]
# vLLM's RequestOutputKind: DELTA, CUMULATIVE, FINAL_ONLY.
OutputKind = Literal["delta", "cumulative", "final"]
OUTPUT_KINDS = ("delta", "cumulative", "final")


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
        requests = self._make_requests(prompts, sampling_params)
        outputs = list(self._stream(requests, "final", use_tqdm))
        outputs.sort(key=lambda output: output.prompt_index)
        return outputs

    def generate_stream(self, prompts: Union[PromptType, Sequence[PromptType]],
                        sampling_params: Union[None, SamplingParams,
                                               Sequence[SamplingParams]] = None,
                        *, output_kind: OutputKind = "delta") -> Iterator[RequestOutput]:
        """Like `generate`, but yield RequestOutputs as tokens arrive (all prompts batched).

        `output_kind` (vLLM's RequestOutputKind): "delta" — each output holds only the new
        token ids and the new text; "cumulative" — everything so far; "final" — one output
        per request when it finishes, in finishing order. Outputs of different prompts
        interleave; `output.prompt_index` is the prompt's position in `prompts`, and the
        last output of each request has `finished=True` and its finish_reason. With stop
        strings, the last `len(longest stop) - 1` characters are held back until the
        request ends, so streamed text never has to be taken back.

        Inputs are validated (ValueError) when this is called, before any request starts;
        requests are queued when iteration starts. Closing the generator early (`break`
        out of a for loop over it, `.close()`, or an exception) aborts its unfinished
        requests and frees their blocks; if you keep a reference to a generator you stop
        iterating, close it (e.g. `contextlib.closing`). Run one stream (or `generate`) at a
        time per LLM.
        """
        if output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {output_kind!r}")
        requests = self._make_requests(prompts, sampling_params)
        return self._stream(requests, output_kind, False)

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

    def _make_requests(self, prompts: Any, sampling_params: Any) -> list[Request]:
        """Validate every prompt and params object and build their Requests (not queued)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return [self._make_request(p, sp) for p, sp in zip(prompt_list, params_list)]

    def _stream(self, requests: list[Request], output_kind: str,
                use_tqdm: bool) -> Iterator[RequestOutput]:
        """The one generation loop (`generate` and `generate_stream`): queue `requests`,
        step the engine until all of them finished, yielding outputs of `output_kind`.
        Whatever ends it early (close, exception) aborts the requests still unfinished."""
        engine = self.engine
        pending: dict[str, int] = {}  # request_id -> prompt index, queued and unfinished
        emitted = [(0, 0)] * len(requests)  # (token ids, text chars) streamed so far
        progress = GenerateProgress(len(requests), enabled=use_tqdm)
        try:
            for index, request in enumerate(requests):
                engine.add_request(request)
                pending[request.request_id] = index
            while pending:
                result = engine.step_with_updates()
                changed: dict[str, Request] = {}
                for request in result.updated + result.finished:
                    if request.request_id in pending:
                        changed.setdefault(request.request_id, request)
                for request_id, index in pending.items():  # e.g. aborted from elsewhere
                    if requests[index].is_finished:
                        changed.setdefault(request_id, requests[index])
                for request_id, request in changed.items():
                    index = pending[request_id]
                    if request.is_finished:
                        del pending[request_id]
                        progress.update(request)
                    output = self._stream_output(request, index, output_kind, emitted)
                    if output is not None:
                        yield output
        finally:
            progress.close()
            for request_id in pending:  # interrupted: leave no request behind
                engine.abort_request(request_id)

    def _stream_output(self, request: Request, index: int, output_kind: str,
                       emitted: list[tuple[int, int]]) -> Optional[RequestOutput]:
        """The output to yield for `request` after a step, or None if there is none."""
        finished = request.is_finished
        if output_kind == "final":
            return self._to_output(request, index) if finished else None
        tokens_done, chars_done = emitted[index]
        text = request.output_text
        visible = len(text)
        if not finished:  # hold back what a stop string spanning steps could still cut
            visible = max(chars_done, visible - _stop_holdback(request.sampling_params))
        num_tokens = len(request.output_token_ids)
        if not finished and num_tokens == tokens_done and visible == chars_done:
            return None
        emitted[index] = (num_tokens, visible)
        if output_kind == "cumulative":
            return self._to_output(request, index, text=text[:visible])
        return self._to_output(request, index, text=text[chars_done:visible],
                               token_ids=request.output_token_ids[tokens_done:],
                               logprobs_from=tokens_done)

    def _to_output(self, request: Request, prompt_index: Optional[int] = None,
                   text: Optional[str] = None,
                   token_ids: Optional[Sequence[int]] = None,
                   logprobs_from: int = 0) -> RequestOutput:
        """`request` as a RequestOutput; `text` / `token_ids` replace the full ones (deltas),
        and a delta's logprobs are those of its tokens (from index `logprobs_from` on);
        `cumulative_logprob` is always the running total."""
        logprobs = None
        if request.sampling_params.logprobs is not None:
            logprobs = list((request.logprobs or [])[logprobs_from:])
        cumulative = request.cumulative_logprob
        if cumulative is None and request.sampling_params.logprobs is not None:
            cumulative = 0.0
        completion = CompletionOutput(
            index=0, text=request.output_text if text is None else text,
            token_ids=list(request.output_token_ids if token_ids is None else token_ids),
            cumulative_logprob=cumulative, logprobs=logprobs,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason)
        metrics = RequestMetrics(arrival_time=request.arrival_time,
                                 first_scheduled_time=request.first_scheduled_time,
                                 first_token_time=request.first_token_time,
                                 finished_time=request.finished_time,
                                 num_preemptions=request.num_preemptions)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=list(request.prompt_token_ids),
                             outputs=[completion], finished=request.is_finished,
                             metrics=metrics, prompt_index=prompt_index)

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


def _stop_holdback(params: SamplingParams) -> int:
    """Characters of output text a stop string could still remove once more text comes:
    a match is cut at its start, which can lie up to len(stop) - 1 characters back."""
    if not params.stop or params.include_stop_str_in_output:
        return 0
    return max(len(stop) for stop in params.stop) - 1


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
