"""Offline beam search (vLLM's `LLM.beam_search`, names and scoring included).

Every step runs each live beam (prompt + tokens so far) as its own request with
`SamplingParams(logprobs=2 * beam_width, max_tokens=1, temperature=0)` and expands it by
the returned top tokens, exactly like vLLM's offline implementation. Unlike vLLM (which
relies on prefix caching), beams share KV blocks: the prompt is prefilled once, and each
later step's request is `Engine.fork_request`ed from the previous step's request of its
parent beam, which finished with `retain_blocks` so its pages are still there. The fork
shares those pages by reference count (copy-on-write for a partly filled last page) and
prefills only the beam's newest token. A fork the KV pool can't hold while other beams'
pages are kept falls back to prefilling its whole prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from .request import Request
from .sampling_params import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search controls (vLLM's names). `beam_width` beams are kept per prompt, each
    extended by up to `max_tokens` tokens; beams are ranked by
    `cum_logprob / len(tokens) ** length_penalty` (tokens include the prompt, and a final
    EOS is not counted, unless `ignore_eos`). With `ignore_eos=False`, a beam that emits EOS
    is complete."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if 2 * self.beam_width > MAX_LOGPROBS:
            raise ValueError(f"beam_width must be <= {MAX_LOGPROBS // 2} (each beam is "
                             f"expanded by its 2 * beam_width most likely tokens), "
                             f"got {self.beam_width}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or lp != lp \
                or lp in (float("inf"), float("-inf")):
            raise ValueError(f"length_penalty must be a finite number, got {lp!r}")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are prompt + generated ids, `logprobs` one {token_id: Logprob}
    dict per generated token, `cum_logprob` the sum of the chosen tokens' logprobs."""

    tokens: list[int]
    logprobs: list = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None


@dataclass
class BeamSearchOutput:
    """The best `beam_width` beams of one prompt, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_ids,
                      length_penalty: float = 1.0) -> float:
    """vLLM's score: cum_logprob / seq_len ** length_penalty, seq_len without a final EOS."""
    seq_len = len(tokens)
    if tokens and tokens[-1] in eos_token_ids:
        seq_len -= 1
    return cum_logprob / (seq_len ** length_penalty)


def beam_search(engine: Any, prompts: Sequence[Sequence[int]],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Run beam search on `engine` (an Engine with a tokenizer) for every tokenized prompt
    (see the module docstring); one output per prompt."""
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    eos = engine.eos_token_ids
    step_params = SamplingParams(logprobs=2 * params.beam_width, max_tokens=1,
                                 temperature=0.0, ignore_eos=True)
    # Validate every prompt up front (building a request queues nothing).
    prompt_tokens = [list(engine.make_request(p, step_params).prompt_token_ids)
                     for p in prompts]

    # With ignore_eos an EOS token is an ordinary token, so it counts in the length too
    # (vLLM always leaves a final EOS out, which makes width 1 differ from greedy there).
    score_eos = frozenset() if params.ignore_eos else eos

    def key(beam: BeamSearchSequence) -> float:
        return beam_search_score(beam.tokens, beam.cum_logprob, score_eos,
                                 params.length_penalty)

    # A live beam is (sequence, request): `request` ran the beam's tokens but the last
    # one, finished with retain_blocks, and its pages are kept (None at the start).
    beams: list[list[tuple[BeamSearchSequence, Optional[Request]]]] = [
        [(BeamSearchSequence(tokens=list(t)), None)] for t in prompt_tokens]
    completed: list[list[BeamSearchSequence]] = [[] for _ in prompt_tokens]
    retained: list[Request] = []  # finished step requests whose pages are still kept
    queued: list[Request] = []  # step requests that may still be unfinished
    try:
        for _ in range(params.max_tokens):
            live = [(i, beam, parent) for i, group in enumerate(beams)
                    for beam, parent in group]
            if not live:
                break
            queued.clear()  # the previous step's requests all finished
            step_requests = [_submit(engine, beam, parent, step_params, queued)
                             for _, beam, parent in live]
            # Every fork holds its own references now: the previous step's pages can go.
            for request in retained:
                engine.release_request(request)
            retained = []
            _run(engine, live, step_requests, step_params, queued, retained)
            candidates: list[list[tuple[BeamSearchSequence, Request]]] = [
                [] for _ in prompt_tokens]
            for (i, beam, _), request in zip(live, step_requests):
                entry = request.logprobs[0]
                for token_id, logprob in entry.items():
                    new = BeamSearchSequence(tokens=beam.tokens + [token_id],
                                             logprobs=beam.logprobs + [entry],
                                             cum_logprob=beam.cum_logprob + logprob.logprob)
                    if token_id in eos and not params.ignore_eos:
                        new.finish_reason = "stop"
                        completed[i].append(new)
                    elif len(new.tokens) >= engine.max_model_len:
                        new.finish_reason = "length"
                        completed[i].append(new)
                    else:
                        candidates[i].append((new, request))
            beams = [sorted(c, key=lambda pair: key(pair[0]), reverse=True)[:params.beam_width]
                     for c in candidates]
    finally:
        for request in queued:
            if not request.is_finished:
                engine.abort_request(request.request_id)
        for request in retained + queued:
            engine.release_request(request)
    beams = [[beam for beam, _ in group] for group in beams]

    results = []
    for group, done in zip(beams, completed):
        for beam in group:
            beam.finish_reason = beam.finish_reason or "length"
        best = sorted(done + group, key=key, reverse=True)[:params.beam_width]
        for beam in best:
            beam.text = engine.tokenizer.decode(beam.tokens)
        results.append(BeamSearchOutput(sequences=best))
    return results


def _submit(engine, beam: BeamSearchSequence, parent: Optional[Request],
            step_params: SamplingParams, queued: list[Request]) -> Request:
    """Queue the step request of `beam`: forked from `parent` (its last token is the only
    new one) when there is a parent, else a plain request for the prompt."""
    if parent is None:
        request = engine.make_request(beam.tokens, step_params)
        request.retain_blocks = True
        queued.append(request)
        engine.add_request(request)
    else:
        request = engine.fork_request(parent, beam.tokens[len(parent.prompt_token_ids):],
                                      step_params, num_parent_tokens=len(parent.prompt_token_ids),
                                      retain_blocks=True)
        queued.append(request)
    return request


def _run(engine, live, step_requests: list[Request], step_params: SamplingParams,
         queued: list[Request], retained: list[Request]) -> None:
    """Step the engine until every step request has its token (and its logprobs).

    A request the scheduler ends without a token (the pool, partly held by finished
    requests' kept pages, could not take it) is run again after those pages are
    released; its re-run then prefills its whole prefix."""
    pending = list(range(len(step_requests)))
    while pending:
        while any(not step_requests[j].is_finished for j in pending):
            engine.step()
        failed = [j for j in pending if not step_requests[j].output_token_ids]
        done = [step_requests[j] for j in pending if step_requests[j].output_token_ids]
        retained.extend(done)
        if failed and not done and not any(r.block_ids for r in retained):
            raise RuntimeError("beam search: the KV cache is too small for one beam")
        if failed:  # free the pool for the re-runs (later forks of these prefill all)
            for request in retained:
                engine.release_request(request)
        for j in failed:
            engine.release_request(step_requests[j])
            _, beam, _ = live[j]
            step_requests[j] = _submit(engine, beam, None, step_params, queued)
        pending = failed
