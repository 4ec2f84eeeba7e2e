"""Logprobs modes (vLLM's logprobs_mode): the sampler's four views of one draw, and the
option's validation on EngineConfig and both CLI commands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import EngineConfig
from pagedjax.sampler import LOGPROBS_MODES, sample, sample_with_logprobs
from pagedjax.step_input import PenaltyTensors, SamplingTensors

V = 40
LOGITS = np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 3
# Row 0 greedy with a logit bias; row 1 temperature 0.7 + top-k 5; row 2 temperature 1.5
# + top-p 0.6 + min-p 0.05.
TEMPERATURE = np.array([0.0, 0.7, 1.5], np.float32)
BIASED_TOKEN = int(np.argsort(LOGITS[0])[-3])  # third most likely, +10: now the top one


def _tensors():
    sampling = SamplingTensors(
        temperature=jnp.asarray(TEMPERATURE), top_p=jnp.asarray([1.0, 1.0, 0.6], jnp.float32),
        top_k=jnp.asarray([0, 5, 0], jnp.int32), min_p=jnp.asarray([0.0, 0.0, 0.05], jnp.float32),
        seed_words=jnp.asarray([[0, 1], [0, 2], [0, 3]], jnp.uint32),
        sample_index=jnp.zeros(3, jnp.int32))
    ids = np.full((3, 16), -1, np.int32)
    ids[0, 0] = BIASED_TOKEN
    bias = np.zeros((3, 16), np.float32)
    bias[0, 0] = 10.0
    penalties = PenaltyTensors(
        repetition_penalty=jnp.ones(3), presence_penalty=jnp.zeros(3),
        frequency_penalty=jnp.zeros(3), token_ids=jnp.asarray(ids),
        output_counts=jnp.zeros((3, 16), jnp.int32), flags=jnp.zeros((3, 16), jnp.int32),
        bias=jnp.asarray(bias))
    return sampling, penalties


def _expected_processed() -> np.ndarray:
    """The logits each row draws from, computed here with numpy (-inf: masked)."""
    out = LOGITS.astype(np.float64).copy()
    out[0, BIASED_TOKEN] += 10.0  # greedy: penalties and bias only, no temperature
    out[1] /= 0.7
    out[1][out[1] < np.sort(out[1])[-5]] = -np.inf  # top-k 5
    row = out[2] / 1.5
    order = np.argsort(-row)
    probs = np.exp(row[order] - row.max())
    probs /= probs.sum()
    keep = order[(np.cumsum(probs) - probs) < 0.6]  # top-p nucleus
    masked = np.full(V, -np.inf)
    masked[keep] = row[keep]
    kept = np.exp(masked - masked.max())
    kept /= kept.sum()
    masked[kept < 0.05 * kept.max()] = -np.inf  # min-p
    out[2] = masked
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    finite_max = np.max(x, axis=-1, keepdims=True)
    return x - finite_max - np.log(np.sum(np.exp(x - finite_max), axis=-1, keepdims=True))


@jax.jit
def _every_mode(logits, sampling, penalties):
    """sample's tokens and sample_with_logprobs in each mode, in one program (plain steps,
    the only ones with logprobs, sample with "any")."""
    return sample(logits, sampling, penalties), {
        mode: sample_with_logprobs(logits, sampling, penalties, "any", mode)
        for mode in LOGPROBS_MODES}


def test_each_mode_reports_its_view_of_the_same_draw():
    processed = _expected_processed()
    expected = {"raw_logprobs": _log_softmax(LOGITS.astype(np.float64)),
                "raw_logits": LOGITS.astype(np.float64),
                "processed_logits": processed,
                "processed_logprobs": _log_softmax(processed)}
    tokens, results = _every_mode(LOGITS, *_tensors())
    tokens = np.asarray(tokens)
    assert tokens[0] == BIASED_TOKEN and np.isfinite(processed[[1, 2], tokens[1:]]).all()
    for mode in LOGPROBS_MODES:
        got_tokens, logprobs = results[mode]
        np.testing.assert_array_equal(got_tokens, tokens)  # the mode never changes a draw
        want = expected[mode]
        np.testing.assert_allclose(logprobs.sampled_logprob, want[np.arange(3), tokens],
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logprobs.top_logprobs, -np.sort(-want, axis=-1)[:, :20],
                                   rtol=1e-5, atol=1e-5)
        rank = 1 + np.sum(want > want[np.arange(3), tokens][:, None], axis=-1)
        np.testing.assert_array_equal(logprobs.sampled_rank, rank)
    # The modes do differ here (the comparisons above mean something).
    assert not np.allclose(expected["raw_logprobs"][1], expected["processed_logprobs"][1])


def test_engine_config_and_cli_take_the_mode():
    from pagedjax.cli import _build_parser, _engine_kwargs

    assert EngineConfig().logprobs_mode == "raw_logprobs"
    assert EngineConfig(logprobs_mode="processed_logits").logprobs_mode == "processed_logits"
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        EngineConfig(logprobs_mode="processed")
    for command, extra in (("serve", []), ("generate", ["hi"])):
        args = _build_parser().parse_args([command, "--logprobs-mode", "processed_logprobs",
                                           *extra])
        assert _engine_kwargs(args)["logprobs_mode"] == "processed_logprobs"
        default = _build_parser().parse_args([command, *extra])
        assert _engine_kwargs(default)["logprobs_mode"] == "raw_logprobs"
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["serve", "--logprobs-mode", "bogus"])


def test_json_logprobs_clamp_masked_tokens():
    """Processed logprobs are -inf for masked tokens; JSON has no such number."""
    from pagedjax.server.logprobs_format import MIN_JSON_LOGPROB, json_logprob

    assert json_logprob(float("-inf")) == MIN_JSON_LOGPROB
    assert json_logprob(-1.5) == -1.5
