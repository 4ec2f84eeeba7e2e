"""LLM.beam_search (vLLM's offline beam search): width 1 is greedy, width 4 matches an
independent beam search over HF transformers' logprobs and beats greedy, params validated."""

import math

import pytest
import torch

from pagedjax import BeamSearchOutput, BeamSearchParams, SamplingParams
from pagedjax.beam_search import beam_search_score
from tests.helpers.engines import TINY_PROMPTS as PROMPTS
from tests.helpers.engines import make_llm
from tests.helpers.hf_reference import hf_logprobs


def hf_next_logprobs(hf, token_ids):
    """HF's float64 next-token log_softmax [V] after token_ids, as a torch tensor."""
    return torch.from_numpy(hf_logprobs(hf, token_ids)[-1])


def hf_beam_search(hf, prompt, beam_width, max_tokens):
    """Reference: the same algorithm over HF's full next-token distribution (no EOS)."""
    beams = [(list(prompt), 0.0)]
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            logprobs = hf_next_logprobs(hf, tokens)
            top = torch.topk(logprobs, 2 * beam_width)
            for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((tokens + [tid], cum + lp))
        candidates.sort(key=lambda c: c[1] / len(c[0]), reverse=True)
        beams = candidates[:beam_width]
    return beams


def test_width_one_is_greedy(llm):
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                         logprobs=0), use_tqdm=False)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))
    assert len(outs) == 2
    for prompt, out, ref in zip(PROMPTS, outs, greedy):
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == 1
        best = out.sequences[0]
        assert best.tokens == prompt + ref.outputs[0].token_ids
        assert best.cum_logprob == pytest.approx(ref.outputs[0].cumulative_logprob, abs=1e-4)
        assert best.text == llm.get_tokenizer().decode(best.tokens)
    llm.engine.block_manager.check_no_leak()


def test_width_four_matches_reference_and_beats_greedy(llm, tiny_llama_hf):
    prompt = PROMPTS[0]
    out = llm.beam_search({"prompt_token_ids": prompt},
                          BeamSearchParams(beam_width=4, max_tokens=3, ignore_eos=True))[0]
    assert len(out.sequences) == 4
    ref = hf_beam_search(tiny_llama_hf, prompt, beam_width=4, max_tokens=3)
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
    for seq, (_, cum) in zip(out.sequences, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
    # Best first by vLLM's score.
    scores = [beam_search_score(s.tokens, s.cum_logprob, set(), 1.0) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    # Each beam's cum_logprob is the model's log-likelihood of its generated tokens.
    best = out.sequences[0]
    total = sum(float(hf_next_logprobs(tiny_llama_hf, best.tokens[:i])[best.tokens[i]])
                for i in range(len(prompt), len(best.tokens)))
    assert best.cum_logprob == pytest.approx(total, abs=1e-4)
    # At least as likely as greedy, and no better than a brute-force search over the same
    # top-8 candidates at every step.
    greedy = llm.generate({"prompt_token_ids": prompt},
                          SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                         logprobs=0), use_tqdm=False)[0].outputs[0]
    assert best.cum_logprob >= greedy.cumulative_logprob - 1e-6
    brute = -math.inf
    level = [(list(prompt), 0.0)]
    for _ in range(3):
        nxt = []
        for tokens, cum in level:
            top = torch.topk(hf_next_logprobs(tiny_llama_hf, tokens), 8)
            nxt += [(tokens + [t], cum + v) for v, t in zip(top.values.tolist(),
                                                            top.indices.tolist())]
        level = nxt
    brute = max(cum for _, cum in level)
    assert best.cum_logprob <= brute + 1e-6
    llm.engine.block_manager.check_no_leak()


def test_eos_beams_complete(llm):
    eos = min(llm.engine.eos_token_ids)
    # Bias nothing: just check that EOS-ended beams are kept as finished and scored
    # without the EOS token (vLLM's rule).
    assert beam_search_score([1, 2, eos], -2.0, {eos}, 1.0) == pytest.approx(-1.0)
    assert beam_search_score([1, 2, 3], -3.0, {eos}, 2.0) == pytest.approx(-3.0 / 9)
    out = llm.beam_search("hello", BeamSearchParams(beam_width=2, max_tokens=2))[0]
    assert 1 <= len(out.sequences) <= 2
    assert all(s.finish_reason in ("stop", "length") for s in out.sequences)


@pytest.mark.parametrize("field, kwargs", [
    ("beam_width", dict(beam_width=0, max_tokens=3)),
    ("beam_width", dict(beam_width=11, max_tokens=3)),
    ("beam_width", dict(beam_width="2", max_tokens=3)),
    ("max_tokens", dict(beam_width=2, max_tokens=0)),
    ("max_tokens", dict(beam_width=2, max_tokens=1.5)),
    ("length_penalty", dict(beam_width=2, max_tokens=3, length_penalty=float("nan"))),
    ("ignore_eos", dict(beam_width=2, max_tokens=3, ignore_eos="yes")),
])
def test_invalid_params_rejected(field, kwargs):
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_params_frozen_and_checked_by_llm(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    with pytest.raises(Exception):
        params.beam_width = 3
    with pytest.raises(ValueError, match="params"):
        llm.beam_search("hi", SamplingParams())


# ---- prefix sharing: beams fork from their parent beam's cached KV -------------------

LONG_PROMPT = list(range(60, 100))  # 40 tokens: 10 full blocks of 4


def reprefill_beam_search(llm, prompt, beam_width, max_tokens):
    """The previous implementation: every step re-submits every beam as a new request."""
    params = SamplingParams(logprobs=2 * beam_width, max_tokens=1, temperature=0.0,
                            ignore_eos=True)
    beams = [(list(prompt), 0.0)]
    for _ in range(max_tokens):
        outs = llm.generate([{"prompt_token_ids": t} for t, _ in beams], params,
                            use_tqdm=False)
        candidates = [(tokens + [tid], cum + lp.logprob)
                      for (tokens, cum), out in zip(beams, outs)
                      for tid, lp in out.outputs[0].logprobs[0].items()]
        beams = sorted(candidates, key=lambda c: c[1] / len(c[0]), reverse=True)[:beam_width]
    return beams


def test_beams_share_prefix_blocks(llm):
    engine = llm.engine
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    prompt_tokens_before = engine.stats.num_prompt_tokens
    engine.stats.peak_used_blocks = 0
    out = llm.beam_search({"prompt_token_ids": LONG_PROMPT}, params)[0]
    prefilled = engine.stats.num_prompt_tokens - prompt_tokens_before
    peak = engine.stats.peak_used_blocks
    engine.block_manager.check_no_leak()
    assert engine.scheduler.num_retained == 0
    # The prompt once, then one new token per beam per step (re-prefilling every beam's
    # whole prefix each step took 40 + 4 * (41 + ... + 47) = 1272 tokens).
    assert prefilled == len(LONG_PROMPT) + params.beam_width * (params.max_tokens - 1)
    # The prompt's 10 blocks are shared; each beam adds at most 3 (its 8 tokens + a
    # copied-on-write block). Four unshared 47-token beams would hold 4 * 12 = 48.
    assert peak <= 10 + params.beam_width * 3
    # Same beams as the re-prefill algorithm.
    ref = reprefill_beam_search(llm, LONG_PROMPT, 4, 8)
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
    for seq, (_, cum) in zip(out.sequences, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
    engine.block_manager.check_no_leak()


def test_beam_search_error_leaks_nothing(llm, monkeypatch):
    engine = llm.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        llm.beam_search({"prompt_token_ids": LONG_PROMPT},
                        BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_retained == 0
    engine.block_manager.check_no_leak()


@pytest.fixture(scope="module")
def small_llm(tiny_llama_dir):
    return make_llm(tiny_llama_dir, num_blocks=33)  # 32 usable blocks of 4 slots


def test_fork_request_shares_blocks_and_survives_preemption(small_llm):
    # 32 usable blocks of 4: two 40-token requests and two forks growing to 55 tokens
    # can't all fit, so the newest running ones (the forks) get preempted and recompute.
    llm = small_llm
    engine, bm = llm.engine, llm.engine.block_manager
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = list(range(20, 50))  # 30 tokens: 7 full blocks and a half-full one
    parent = engine.make_request(prompt, SamplingParams(temperature=0, max_tokens=1,
                                                        ignore_eos=True))
    parent.retain_blocks = True
    engine.add_request(parent)
    while engine.has_unfinished_requests():
        engine.step()
    assert parent.is_finished and len(parent.block_ids) == 8  # kept after finishing
    assert engine.scheduler.num_retained == 1
    others = [engine.make_request(list(range(100 + 50 * k, 140 + 50 * k)), greedy)
              for k in range(2)]
    for request in others:
        engine.add_request(request)
    forks = [engine.fork_request(parent, [tok], greedy, num_parent_tokens=30)
             for tok in (77, 78)]
    for fork in forks:
        assert fork.prompt_token_ids == prompt + [fork.prompt_token_ids[-1]]
        assert fork.num_computed_tokens == 30 and fork.block_ids == parent.block_ids
    assert all(bm.ref_count(b) == 3 for b in parent.block_ids)
    engine.release_request(parent)
    engine.release_request(parent)  # idempotent
    assert engine.scheduler.num_retained == 0
    prompt_before, copies_before = engine.stats.num_prompt_tokens, engine.stats.num_block_copies
    while engine.has_unfinished_requests():
        engine.step()
    assert sum(f.num_preemptions for f in forks) >= 1
    assert engine.stats.num_block_copies > copies_before  # the shared half-full block
    recomputed = sum(31 * f.num_preemptions for f in forks)
    assert engine.stats.num_prompt_tokens - prompt_before >= 80 + 2 + recomputed
    bm.check_no_leak()
    refs = llm.generate([{"prompt_token_ids": f.prompt_token_ids} for f in forks] +
                        [{"prompt_token_ids": r.prompt_token_ids} for r in others],
                        greedy, use_tqdm=False)
    for request, ref in zip(forks + others, refs):
        assert request.output_token_ids == ref.outputs[0].token_ids
    bm.check_no_leak()


def test_fork_request_validation(llm):
    engine = llm.engine
    parent = engine.make_request([1, 2, 3], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="num_parent_tokens"):
        engine.fork_request(parent, [4], SamplingParams(), num_parent_tokens=9)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.fork_request(parent, [4], SamplingParams(prompt_logprobs=1))
    with pytest.raises(ValueError, match="parent"):
        engine.fork_request("x", [4], SamplingParams())
    # A parent holding no pages: the fork is a plain request for its whole prompt.
    fork = engine.fork_request(parent, [4, 5], SamplingParams(max_tokens=2, temperature=0,
                                                              ignore_eos=True))
    assert fork.prompt_token_ids == [4, 5] and fork.num_computed_tokens == 0
    fork2 = engine.fork_request(parent, [9], SamplingParams(max_tokens=2, temperature=0),
                                num_parent_tokens=3)
    assert fork2.prompt_token_ids == [1, 2, 3, 9] and not fork2.block_ids
    while engine.has_unfinished_requests():
        engine.step()
    assert len(fork.output_token_ids) == 2
    engine.block_manager.check_no_leak()


def test_beam_search_in_a_pool_too_small_to_keep_every_beam(small_llm):
    # A 118-token prompt takes 30 of the 32 blocks; four beams' own blocks plus their
    # copies on write don't fit next to it, so some steps fall back to re-running beams
    # with their whole prefix. The beams must not change.
    prompt = [(7 * i) % 200 + 3 for i in range(118)]
    before = small_llm.engine.stats.num_prompt_tokens
    out = small_llm.beam_search({"prompt_token_ids": prompt},
                                BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True))[0]
    assert small_llm.engine.stats.num_prompt_tokens - before > 118 + 4 * 5  # fell back
    small_llm.engine.block_manager.check_no_leak()
    assert small_llm.engine.scheduler.num_retained == 0
    ref = reprefill_beam_search(small_llm, prompt, 4, 6)
    assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in ref]
    for seq, (_, cum) in zip(out.sequences, ref):
        assert seq.cum_logprob == pytest.approx(cum, abs=1e-4)
    small_llm.engine.block_manager.check_no_leak()
