"""LLM: the offline batched API (vLLM's `LLM(...).generate(...)`)."""

from __future__ import annotations

import time
from typing import Any, Iterator, Literal, Optional, Sequence, Union

from pagedjax.models import SUPPORTED_ARCHITECTURES, ModelConfig

from .beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from .config import EngineConfig
from .data_parallel import make_engine
from .engine import KVCacheStats
from .flax_params import params_from_flax
from .input_processor import PromptType, as_prompt_list
from .output_stream import OUTPUT_KINDS, OutputStream
from .outputs import RequestOutput
from .progress import GenerateProgress
from .request import Request
from .sampling_params import SamplingParams

# vLLM's RequestOutputKind: DELTA, CUMULATIVE, FINAL_ONLY.
OutputKind = Literal["delta", "cumulative", "final"]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    `model` is a local directory (HF config.json + safetensors + tokenizer), a .gguf file,
    a hub id found in the local HF cache (or downloaded unless HF_HUB_OFFLINE is set), or
    None for the default SmolLM2-135M-Instruct GGUF. `revision` picks a hub id's branch,
    tag or commit (default: main). Use `LLM.from_params` to serve weights that already
    live in memory. `tensor_parallel_size` / `mesh` split the model over devices and
    `data_parallel_size` runs that many replicas side by side (EngineConfig).
    """

    def __init__(self, model: Optional[str] = None, *, revision: Optional[str] = None,
                 dtype: str = "auto",
                 max_model_len: Optional[int] = None, block_size: int = 64,
                 num_blocks: Optional[int] = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 512, min_token_bucket: Optional[int] = None,
                 seed: int = 0, kv_cache_memory_bytes: int = 1 << 30,
                 kv_cache_memory_fraction: float = 0.9,
                 attention_backend: str = "auto", num_scheduler_steps: int = 1,
                 async_scheduling: bool = False, enable_prefix_caching: bool = True,
                 prefix_caching_hash_algo: str = "builtin",
                 logprobs_mode: str = "raw_logprobs", tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, mesh: Any = None, tokenizer: Any = None,
                 _loaded: Optional[tuple] = None):
        engine_config = EngineConfig(
            dtype=dtype, max_model_len=max_model_len, block_size=block_size,
            num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, min_token_bucket=min_token_bucket,
            seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            attention_backend=attention_backend, num_scheduler_steps=num_scheduler_steps,
            async_scheduling=async_scheduling, enable_prefix_caching=enable_prefix_caching,
            prefix_caching_hash_algo=prefix_caching_hash_algo, logprobs_mode=logprobs_mode,
            tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
            mesh=mesh)
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
        self.engine = make_engine(model_config, params, self.tokenizer.eos_token_ids,
                                  engine_config, tokenizer=self.tokenizer)

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
        requests = self.engine.input_processor.make_requests(prompts, sampling_params)
        outputs = list(self._stream(requests, "final", use_tqdm))
        outputs.sort(key=lambda output: output.prompt_index)
        return outputs

    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: one BeamSearchOutput per prompt, its `sequences`
        (prompt + generated `tokens`, `text`, `cum_logprob`) sorted best first. Each step
        forks every beam from its parent beam's cached KV blocks, so only the new token is
        prefilled (pagedjax/beam_search.py)."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        processor = self.engine.input_processor
        prompt_tokens = [processor.tokenize(prompt)[1] for prompt in as_prompt_list(prompts)]
        return beam_search(self.engine, prompt_tokens, params)

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
        requests = self.engine.input_processor.make_requests(prompts, sampling_params)
        return self._stream(requests, output_kind, False)

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True,
             continue_final_message: bool = False,
             tools: Optional[list[dict]] = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the chat template.

        `chat_template` (template text, or the name of one of the model's named templates)
        overrides the model's; a model without one needs it (ValueError otherwise).
        `continue_final_message=True` leaves the last (e.g. assistant) message open so the
        model continues it (transformers' semantics); it needs add_generation_prompt=False.
        `tools` (OpenAI tool definitions) are passed to the template, for models that know
        tools; the replies are text (the server parses tool calls out of them).
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt": self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template, continue_final_message=continue_final_message,
                tools=tools),
             "add_special_tokens": False}
            for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _stream(self, requests: list[Request], output_kind: str,
                use_tqdm: bool) -> Iterator[RequestOutput]:
        """The one generation loop (`generate` and `generate_stream`): queue `requests`,
        step the engine until all of them finished, yielding outputs of `output_kind`
        (output_stream.OutputStream). Whatever ends it early (close, exception) aborts
        the requests still unfinished.

        With n > 1 a prompt has n sequences. "final" yields one output per prompt with
        all n completions once the last one finished; "delta" and "cumulative" yield each
        sequence's progress as its own RequestOutput with the prompt's request_id,
        `outputs[0].index` = the completion index, and `finished=True` only on the
        output that ends the prompt's last sequence."""
        engine = self.engine
        stream = OutputStream(output_kind)
        progress = GenerateProgress(len(requests), enabled=use_tqdm)
        try:
            for index, request in enumerate(requests):
                engine.add_request(request)
                stream.add(request, index)
            while stream.unfinished_ids:
                result = engine.step_with_updates()
                for output, prompt_done in stream.outputs(result.updated + result.finished):
                    if prompt_done:
                        progress.update(output)
                    yield output
        finally:
            progress.close()
            for request_id in stream.unfinished_ids:  # interrupted: leave no request behind
                engine.abort_request(request_id)

    # ---- engine controls -----------------------------------------------------------

    def warmup(self) -> float:
        """Compile every bucket shape now; returns the seconds it took."""
        start = time.perf_counter()
        self.engine.warmup()
        return time.perf_counter() - start

    def update_params(self, params: Any) -> None:
        """Use new weights of the same shapes (e.g. the latest training step): no
        recompile, the KV pool stays, device arrays already in the engine's dtype and form
        are used as they are (no copy), and cached prefixes of the old weights are never
        reused. Accepts the same containers as `from_params`; allowed while asleep."""
        self.engine.set_params(params_from_flax(params))

    def sleep(self, level: int = 1) -> None:
        """Give device memory back to a trainer between generate calls: level 1 frees the
        KV pool, level 2 also lets go of the weights (the next `update_params` brings them
        back). Compiled programs are kept: `wake_up` recompiles nothing. Generating while
        asleep raises EngineNotReady (a RuntimeError)."""
        self.engine.sleep(level)

    def wake_up(self) -> None:
        """Reallocate the KV pool freed by `sleep`."""
        self.engine.wake_up()

    @property
    def is_sleeping(self) -> bool:
        """True between `sleep` and `wake_up`."""
        return self.engine.is_sleeping

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (vLLM's reset_prefix_cache)."""
        self.engine.reset_prefix_cache()

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
