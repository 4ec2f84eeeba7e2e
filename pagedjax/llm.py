"""LLM: the offline batched API (vLLM's `LLM(...).generate(...)`)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence, Union

from pagedjax.models import SUPPORTED_ARCHITECTURES, ModelConfig

from .beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from .config import EngineConfig
from .engine import Engine, KVCacheStats
from .flax_params import params_from_flax
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
    a hub id found in the local HF cache (or downloaded unless HF_HUB_OFFLINE is set), or
    None for the default SmolLM2-135M-Instruct GGUF. `revision` picks a hub id's branch,
    tag or commit (default: main). Use `LLM.from_params` to serve weights that already
    live in memory.
    """

    def __init__(self, model: Optional[str] = None, *, revision: Optional[str] = None,
                 dtype: str = "auto",
                 max_model_len: Optional[int] = None, block_size: int = 64,
                 num_blocks: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512, seed: int = 0,
                 kv_cache_memory_bytes: int = 1 << 30, kv_cache_memory_fraction: float = 0.9,
                 attention_backend: str = "auto", num_scheduler_steps: int = 1,
                 async_scheduling: bool = False, tokenizer: Any = None,
                 _loaded: Optional[tuple] = None):
        engine_config = EngineConfig(
            dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            attention_backend=attention_backend, num_scheduler_steps=num_scheduler_steps,
            async_scheduling=async_scheduling)
        if _loaded is None:
            from .loading import load_model  # pulls in gguf/safetensors only when loading

            model_config, params, loaded_tokenizer = load_model(
                model, supported_architectures=SUPPORTED_ARCHITECTURES, revision=revision)
        else:
            model_config, params, loaded_tokenizer = _loaded
        self.model = model
        self.revision = revision
        self.tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if self.tokenizer is None:
            raise ValueError("tokenizer: none was given and the model has none")
        self.engine = Engine(model_config, params, self.tokenizer.eos_token_ids, engine_config,
                             tokenizer=self.tokenizer)

    @classmethod
    def from_params(cls, params: Any, config: ModelConfig, tokenizer: Any,
                    **engine_kwargs) -> "LLM":
        """Serve an in-memory params pytree (e.g. from a training run) with its config.

        `params` is the params dict, linen variables `{"params": ...}`, an `nnx.State`,
        `nnx.split(...)` output or an `nnx.Module` (see `pagedjax.params_from_flax`).
        Device arrays already in the engine dtype are used as they are, never copied."""
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        params = params_from_flax(params)
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

    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: one BeamSearchOutput per prompt, its `sequences`
        (prompt + generated `tokens`, `text`, `cum_logprob`) sorted best first. Each step
        forks every beam from its parent beam's cached KV blocks, so only the new token is
        prefilled (pagedjax/beam_search.py)."""
        return beam_search(self, prompts, params)

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
             add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the chat template.

        `chat_template` (template text, or the name of one of the model's named templates)
        overrides the model's; a model without one needs it (ValueError otherwise).
        `continue_final_message=True` leaves the last (e.g. assistant) message open so the
        model continues it (transformers' semantics); it needs add_generation_prompt=False.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt": self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template, continue_final_message=continue_final_message),
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
        Whatever ends it early (close, exception) aborts the requests still unfinished.

        With n > 1 a prompt has n sequences (Request.sequences). "final" yields one output
        per prompt with all n completions once the last one finished; "delta" and
        "cumulative" yield each sequence's progress as its own RequestOutput with the
        prompt's request_id, `outputs[0].index` = the completion index, and
        `finished=True` only on the output that ends the prompt's last sequence."""
        engine = self.engine
        # sequence request_id -> (prompt index, parent request, sequence), unfinished
        pending: dict[str, tuple[int, Request, Request]] = {}
        emitted: dict[str, tuple[int, int]] = {}  # (token ids, text chars) streamed so far
        progress = GenerateProgress(len(requests), enabled=use_tqdm)
        try:
            for index, request in enumerate(requests):
                engine.add_request(request)
                for seq in _sequences(request):
                    pending[seq.request_id] = (index, request, seq)
                    emitted[seq.request_id] = (0, 0)
            while pending:
                result = engine.step_with_updates()
                changed: dict[str, Request] = {}
                for request in result.updated + result.finished:
                    if request.request_id in pending:
                        changed.setdefault(request.request_id, request)
                for request_id, (_, _, seq) in pending.items():  # e.g. aborted elsewhere
                    if seq.is_finished:
                        changed.setdefault(request_id, seq)
                for request_id, seq in changed.items():
                    index, parent, _ = pending[request_id]
                    if seq.is_finished:
                        del pending[request_id]
                    group_done = not any(s.request_id in pending for s in _sequences(parent))
                    if seq.is_finished and group_done:
                        progress.update(parent)
                    output = self._stream_output(seq, parent, index, output_kind, emitted,
                                                 group_done)
                    if output is not None:
                        yield output
        finally:
            progress.close()
            for request_id in pending:  # interrupted: leave no request behind
                engine.abort_request(request_id)

    def _stream_output(self, seq: Request, parent: Request, index: int, output_kind: str,
                       emitted: dict[str, tuple[int, int]],
                       group_done: bool) -> Optional[RequestOutput]:
        """The output to yield for sequence `seq` of prompt `parent` after a step, or
        None if there is none; `group_done`: no sequence of the prompt is left."""
        finished = seq.is_finished
        group = _sequences(parent)
        if output_kind == "final":
            if not (finished and group_done):
                return None
            output = self._to_output(parent, index)
            if len(group) > 1:
                completions = []
                for s in group:
                    completion = self._to_output(s, index).outputs[0]
                    completion.index = s.child_index
                    completions.append(completion)
                output.outputs = completions
            return output
        tokens_done, chars_done = emitted[seq.request_id]
        text = seq.output_text
        visible = len(text)
        if not finished:  # hold back what a stop string spanning steps could still cut
            visible = max(chars_done, visible - seq.sampling_params.stop_holdback)
        num_tokens = len(seq.output_token_ids)
        if not finished and num_tokens == tokens_done and visible == chars_done:
            return None
        emitted[seq.request_id] = (num_tokens, visible)
        if output_kind == "cumulative":
            output = self._to_output(seq, index, text=text[:visible])
        else:
            output = self._to_output(seq, index, text=text[chars_done:visible],
                                     token_ids=seq.output_token_ids[tokens_done:],
                                     logprobs_from=tokens_done)
        if len(group) > 1:
            output.request_id = parent.request_id
            output.outputs[0].index = seq.child_index
            output.finished = finished and group_done
        return output

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
                             metrics=metrics, prompt_index=prompt_index,
                             prompt_logprobs=_prompt_logprobs(request))

    # ---- engine controls -----------------------------------------------------------

    def warmup(self) -> float:
        """Compile every bucket shape now; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.warmup()
        return time.perf_counter() - start

    def update_params(self, params: Any) -> None:
        """Use new weights of the same shapes (e.g. the latest training step); no recompile.
        Accepts the same containers as `from_params`."""
        self.engine.set_params(params_from_flax(params))

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


def _prompt_logprobs(request: Request) -> Optional[list]:
    """The request's prompt logprobs (vLLM's layout: None first), or None if not asked."""
    if request.sampling_params.prompt_logprobs is None:
        return None
    return list(request.prompt_logprobs or [None])


def _sequences(request: Request) -> list[Request]:
    """The sequences of one prompt: the request itself, or its n sequences when n > 1."""
    return request.sequences or [request]


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
