"""Command line: `pagedjax generate [--model M] PROMPT...` and `pagedjax serve [MODEL]`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from .sampler import LOGPROBS_MODES


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedjax",
                                     description="pure-JAX LLM inference with a paged KV cache")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default=None,
                     help="model dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    _add_engine_arguments(gen)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None,
                       help="model dir, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 (or PAGEDJAX_API_KEY)")
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--chat-template", default=None, help="a Jinja template or its file")
    serve.add_argument("--trust-request-chat-template", action="store_true",
                       help="accept a chat_template in requests (rendered in a worker "
                            "process, with a time and output limit)")
    serve.add_argument("--max-sequences-per-request", type=int, default=256,
                       help="most prompts x n in one completion request")
    serve.add_argument("--request-read-timeout", type=float, default=30.0,
                       help="seconds a request's headers, then its body, may take to arrive")
    serve.add_argument("--keep-alive-timeout", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="on shutdown, seconds in-flight requests get to finish before "
                            "they are failed")
    serve.add_argument("--no-warmup", action="store_true",
                       help="compile step programs on first use instead of before serving")
    serve.add_argument("--enable-control-endpoints", action="store_true",
                       help="serve /pause, /resume, /sleep, /wake_up, /is_paused and "
                            "/is_sleeping (for an RL controller)")
    _add_engine_arguments(serve)
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None,
                        help="branch, tag or commit of a hub id model (default: main)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's max_position_embeddings")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--min-token-bucket", type=int, default=None,
                        help="smallest step shape in tokens (default: 1 on CPU, 16 elsewhere)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="engine seed: requests draw from keys derived from it")
    parser.add_argument("--num-scheduler-steps", type=int, default=1,
                        help="decode steps per device call when every sequence is decoding "
                             "(pays on a GPU, where host work rivals a step)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="dispatch each decode call before the previous one's tokens "
                             "reach the host, at any --num-scheduler-steps")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="reuse the KV pages of prompt prefixes already "
                                           "computed (--no-enable-prefix-caching: off)")
    parser.add_argument("--prefix-caching-hash-algo", choices=["builtin", "sha256"],
                        default="builtin",
                        help="page keys: Python's hash, or sha256 where collisions must "
                             "be impossible to provoke")
    parser.add_argument("--logprobs-mode", choices=list(LOGPROBS_MODES),
                        default="raw_logprobs",
                        help="what logprobs return: log_softmax of the model's logits (raw) "
                             "or of the logits sampled from, after penalties, temperature, "
                             "top-k/p, min-p (processed); or those logits themselves")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over this many devices (heads, MLP, vocabulary)")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engine replicas, each on its own tensor-parallel devices")
    parser.add_argument("--coordinator-address", default=None,
                        help="multi-host: HOST:PORT of process 0, where every process meets "
                             "(jax.distributed); process 0 schedules, the others follow")
    parser.add_argument("--num-processes", type=int, default=None,
                        help="multi-host: how many processes (hosts) run this command")
    parser.add_argument("--process-id", type=int, default=None,
                        help="multi-host: this process's rank, 0 to num-processes - 1")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                max_num_batched_tokens=args.max_num_batched_tokens,
                min_token_bucket=args.min_token_bucket, num_blocks=args.num_blocks, seed=args.seed,
                num_scheduler_steps=args.num_scheduler_steps,
                async_scheduling=args.async_scheduling,
                enable_prefix_caching=args.enable_prefix_caching,
                prefix_caching_hash_algo=args.prefix_caching_hash_algo,
                logprobs_mode=args.logprobs_mode,
                tensor_parallel_size=args.tensor_parallel_size,
                data_parallel_size=args.data_parallel_size)


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the other processes when the multi-host options are given."""
    if args.coordinator_address is None and args.num_processes is None:
        return
    from pagedjax import distributed

    distributed.initialize(args.coordinator_address, num_processes=args.num_processes,
                           process_id=args.process_id)


def _lead_or_follow(llm, lead, warmup: bool = False) -> int:
    """Process 0 (or a single process): run `lead()`, then release the others; the others
    replay process 0's device operations until then (compiling every program first with
    `warmup`, as process 0's server does, so no step waits on a follower's compile)."""
    from pagedjax import distributed

    if not distributed.is_leader():
        if warmup:
            llm.warmup()
        distributed.follow(llm)
        return 0
    try:
        return lead()
    finally:
        distributed.shutdown(llm)


def _serve(args: argparse.Namespace) -> int:
    from pagedjax import LLM
    from pagedjax.server import ServerConfig, serve

    _start_distributed(args)

    config = ServerConfig(max_sequences_per_request=args.max_sequences_per_request,
                          request_read_timeout_s=args.request_read_timeout,
                          keep_alive_timeout_s=args.keep_alive_timeout,
                          shutdown_timeout_s=args.shutdown_timeout,
                          trust_request_chat_template=args.trust_request_chat_template,
                          enable_control_endpoints=args.enable_control_endpoints)
    llm = LLM(args.model, revision=args.revision, **_engine_kwargs(args))
    return _lead_or_follow(llm, lambda: serve(
        llm, host=args.host, port=args.port, warmup=not args.no_warmup,
        served_model_names=args.served_model_name or (), api_key=args.api_key,
        chat_template=args.chat_template, config=config), warmup=not args.no_warmup)


def _generate(args: argparse.Namespace) -> int:
    from pagedjax import LLM

    _start_distributed(args)
    load_start = time.perf_counter()
    llm = LLM(args.model, revision=args.revision, **_engine_kwargs(args))
    load_seconds = time.perf_counter() - load_start
    return _lead_or_follow(llm, lambda: _generate_and_print(args, llm, load_seconds))


def _generate_and_print(args: argparse.Namespace, llm, load_seconds: float) -> int:
    from pagedjax import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(list(args.prompts), params)
    seconds = time.perf_counter() - start
    for prompt, output in zip(args.prompts, outputs):
        print(f"\n>>> {prompt}")
        print(output.outputs[0].text)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.kv_cache_stats()
    print(f"\n{len(outputs)} prompts, {generated} tokens in {seconds:.2f}s: "
          f"{generated / seconds:.1f} tokens/s (includes {llm.engine.compile_seconds:.1f}s "
          f"compiling {llm.num_compiles} step programs; model load {load_seconds:.1f}s; "
          f"KV pool {stats.num_blocks} blocks x {stats.block_size} tokens, "
          f"mean block-tail waste {llm.engine.stats.mean_waste:.1%})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `pagedjax` command."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
