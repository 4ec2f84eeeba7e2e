"""HF transformers reference computations shared by the parity tests."""

from types import SimpleNamespace

import jax
import numpy as np
import torch
from pagedjax.models import build_model

from pagedjax.batching import build_step_input
from pagedjax.request import Request
from pagedjax.sampling_params import SamplingParams


def hf_greedy(hf, token_ids, num_tokens):
    """HF's greedy continuation that, like ignore_eos, goes on past EOS."""
    with torch.no_grad():
        out = hf(torch.tensor([token_ids]), use_cache=True)
        generated = []
        for _ in range(num_tokens):
            generated.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([[generated[-1]]]), cache=out.cache, use_cache=True)
    return generated


def hf_logits(hf, token_ids):
    """HF's fp32 logits [len(token_ids), V] for one sequence."""
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float().numpy()


def check_paged_logits(engine, hf, atol: float, rtol: float = 1e-4) -> None:
    """Chunked two-sequence prefill, then four two-sequence decode steps, each step's
    last-token logits compared with HF's full forward of the same tokens."""
    model = build_model(engine.model_config)
    apply = jax.jit(lambda p, s, kv: model.apply({"params": p}, s, kv))
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (9, 20)]
    requests = [Request(request_id=str(i), prompt_token_ids=p,
                        sampling_params=SamplingParams(temperature=0), seed=0)
                for i, p in enumerate(prompts)]

    def step(chunks):
        for chunk in chunks:
            assert engine.block_manager.ensure_capacity(
                chunk.request, chunk.start_position + chunk.num_new_tokens)
        _, step_input = build_step_input(chunks, engine.buckets, engine.config.block_size)
        logits, engine.runner.kv_cache = apply(engine.runner.params, jax.device_put(step_input),
                                               engine.runner.kv_cache)
        return np.asarray(logits, dtype=np.float32)[:len(chunks)]

    def compare(got, sequences):
        for row, seq in zip(got, sequences):
            np.testing.assert_allclose(row, hf_logits(hf, seq)[-1], atol=atol, rtol=rtol)

    # Prefill both prompts in one step, the second in two chunks (6 + 14 tokens).
    step([SimpleNamespace(request=requests[1], start_position=0, num_new_tokens=6)])
    got = step([SimpleNamespace(request=requests[0], start_position=0, num_new_tokens=9),
                SimpleNamespace(request=requests[1], start_position=6, num_new_tokens=14)])
    compare(got, prompts)
    sequences = [list(p) for p in prompts]
    for _ in range(4):
        for seq, request in zip(sequences, requests):
            seq.append(int(np.argmax(hf_logits(hf, seq)[-1])))
            request.output_token_ids.append(seq[-1])
        got = step([SimpleNamespace(request=r, start_position=len(s) - 1, num_new_tokens=1)
                    for r, s in zip(requests, sequences)])
        compare(got, sequences)
    for request in requests:
        engine.block_manager.free(request)


def hf_logprobs(hf, token_ids):
    """HF's log_softmax [len(token_ids), V] (float64) for one sequence."""
    with torch.no_grad():
        logits = hf(torch.tensor([token_ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_greedy_matches_hf(llm, hf, lengths, num_tokens: int = 32) -> None:
    """Random prompts of `lengths` generated greedily as one batch through the engine give
    HF's greedy ids (past EOS too), with more than one sequence per step and no leak."""
    rng = np.random.default_rng(1)
    vocab = llm.engine.model_config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.stats.max_seqs_in_step > 1
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, num_tokens)
    llm.engine.block_manager.check_no_leak()
