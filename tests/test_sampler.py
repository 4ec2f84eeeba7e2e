"""pagedjax.sampler.sample: greedy, temperature, top-k, top-p, min-p and per-request keys.

Distribution tests draw N rows that share logits and settings but differ in sample_index, so
each row samples with its own key; the empirical histogram is compared with the exact target
distribution by total-variation (TV) distance. The bound used is

    E[TV] + sqrt(ln(1/delta) / (2N)),   E[TV] <= 0.5 * sum_i sqrt(p_i (1 - p_i) / N)

(TV of an empirical distribution is (1/N)-Lipschitz in each draw, so McDiarmid gives a
failure probability <= delta for a correct sampler). Every test also checks that the
plausible wrong answers (no masking, uniform over the kept set, temperature ignored, top-p
before top-k, ...) are at least twice that bound away from the target, so the test can tell
them apart from the right one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.sampler import ARGMAX_BLOCK, _apply_top_k_top_p, argmax_rows, sample
from pagedjax.step_input import SamplingTensors

V = 32  # vocab for the statistical tests
N = 4000  # draws per distribution test (one batch, one compile for every test)
DELTA = 1e-4

_sample = jax.jit(sample)

# A fixed, hand-made distribution with no ties and no top-p / min-p boundary near the
# thresholds used below: p = 0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01 + tail.
_HEAD = np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
_WEIGHTS = np.concatenate([_HEAD, np.linspace(0.004, 0.001, V - len(_HEAD))])
HAND_LOGITS = np.log(_WEIGHTS / _WEIGHTS.sum()).astype(np.float32)
# Shuffle token ids so "top tokens" are not simply the lowest ids.
_PERM = np.random.default_rng(0).permutation(V)
HAND_LOGITS = HAND_LOGITS[np.argsort(_PERM)]
RANDOM_LOGITS = (np.random.default_rng(1).normal(size=V) * 2.0).astype(np.float32)


def _tensors(batch, *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=1234,
             sample_index=None):
    def col(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()

    seeds = np.broadcast_to(np.asarray(seed, np.uint64), (batch,))
    seed_words = np.stack([(seeds >> np.uint64(32)).astype(np.uint32),
                           (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)], axis=-1)
    if sample_index is None:
        sample_index = np.arange(batch)
    return SamplingTensors(
        temperature=jnp.asarray(col(temperature, np.float32)),
        top_p=jnp.asarray(col(top_p, np.float32)),
        top_k=jnp.asarray(col(top_k, np.int32)),
        min_p=jnp.asarray(col(min_p, np.float32)),
        seed_words=jnp.asarray(seed_words),
        sample_index=jnp.asarray(col(sample_index, np.int32)),
    )


def _draw(logits_row, seed=1234, **params):
    logits = jnp.asarray(np.broadcast_to(logits_row, (N, V)))
    tokens = np.asarray(_sample(logits, _tensors(N, seed=seed, **params)))
    assert tokens.shape == (N,) and tokens.dtype == np.int32
    return tokens


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _restrict(p, keep):
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def _tv_bound(p, n=N):
    p = np.asarray(p)
    return 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + np.sqrt(np.log(1 / DELTA) / (2 * n))


def _check_distribution(tokens, expected, wrong_alternatives):
    bound = _tv_bound(expected)
    for name, alt in wrong_alternatives.items():
        assert _tv(alt, expected) > 2 * bound, f"test cannot tell {name} apart"
    empirical = np.bincount(tokens, minlength=V) / len(tokens)
    tv = _tv(empirical, expected)
    assert tv < bound, f"TV {tv:.4f} >= bound {bound:.4f}"
    for name, alt in wrong_alternatives.items():
        assert _tv(empirical, alt) > bound, f"samples look like {name}"


def _top_k_set(p, k):
    keep = np.zeros(len(p), bool)
    keep[np.argsort(-p, kind="stable")[:k]] = True
    return keep


def _nucleus(p, top_p):
    """Smallest set of top tokens whose mass >= top_p (vLLM/HF semantics)."""
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    # No boundary ambiguity in the chosen cases.
    assert np.min(np.abs(cum - top_p)) > 1e-3
    count = int(np.searchsorted(cum, top_p) + 1)
    keep = np.zeros(len(p), bool)
    keep[order[:count]] = True
    return keep


def _uniform(keep):
    return keep / keep.sum()


# ---------------------------------------------------------------- greedy


def test_greedy_rows_take_argmax_in_mixed_batch():
    rng = np.random.default_rng(2)
    batch = 64
    logits = rng.normal(size=(batch, V)).astype(np.float32) * 3
    temperature = np.where(np.arange(batch) % 2 == 0, 0.0, 1.5).astype(np.float32)
    # Greedy rows ignore top-k/top-p/min-p; random rows use a mixture of them.
    tensors = _tensors(batch, temperature=temperature,
                       top_k=np.arange(batch) % 5, top_p=np.where(np.arange(batch) % 3, 0.9, 1.0),
                       min_p=np.where(np.arange(batch) % 4 == 1, 0.1, 0.0))
    tokens = np.asarray(_sample(jnp.asarray(logits), tensors))
    greedy = temperature == 0.0
    np.testing.assert_array_equal(tokens[greedy], logits.argmax(-1)[greedy])
    # The random rows really sample (not argmax everywhere) with such flat-ish logits.
    assert np.any(tokens[~greedy] != logits.argmax(-1)[~greedy])
    assert np.all((tokens >= 0) & (tokens < V))


def test_all_greedy_batch_is_argmax():
    logits = np.random.default_rng(3).normal(size=(16, V)).astype(np.float32)
    tokens = np.asarray(_sample(jnp.asarray(logits), _tensors(16, temperature=0.0, top_k=3)))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("vocab", [ARGMAX_BLOCK * 3, ARGMAX_BLOCK * 2 + 77, 5])
def test_two_level_argmax_is_numpy_argmax_with_ties(vocab):
    """First index of the maximum, also with ties across and inside blocks, a vocabulary
    that is not a whole number of blocks, and all-equal rows."""
    rng = np.random.default_rng(vocab)
    logits = rng.integers(-3, 3, size=(8, vocab)).astype(np.float32)  # many ties
    logits[1, vocab - 1] = 10.0  # maximum in the padded last block
    logits[2, [0, vocab - 1]] = 10.0  # tie between the first and the last block
    logits[3] = 1.0  # every entry equal
    logits[4, :] = -np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax_rows)(jnp.asarray(logits))),
                                  logits.argmax(-1))


# ---------------------------------------------------------------- temperature


def test_temperature_matches_scaled_softmax():
    tokens = _draw(RANDOM_LOGITS, temperature=0.7)
    expected = _softmax(RANDOM_LOGITS / 0.7)
    _check_distribution(tokens, expected, {
        "temperature ignored": _softmax(RANDOM_LOGITS),
        "temperature multiplied": _softmax(RANDOM_LOGITS * 0.7),
    })


def test_plain_sampling_matches_softmax():
    tokens = _draw(HAND_LOGITS, seed=99)
    _check_distribution(tokens, _softmax(HAND_LOGITS), {
        "argmax": np.eye(V)[HAND_LOGITS.argmax()],
        "uniform": np.full(V, 1 / V),
    })


def test_high_temperature_flattens():
    tokens = _draw(RANDOM_LOGITS, temperature=100.0)
    expected = _softmax(RANDOM_LOGITS / 100.0)
    assert _tv(expected, np.full(V, 1 / V)) < 0.02  # nearly uniform
    _check_distribution(tokens, expected, {"temperature ignored": _softmax(RANDOM_LOGITS)})
    # Every token shows up, and the favourite is far less dominant than at temperature 1.
    counts = np.bincount(tokens, minlength=V)
    assert counts.min() > 0
    assert counts.max() / N < 0.5 * _softmax(RANDOM_LOGITS).max()


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("logits,k,temperature", [
    (HAND_LOGITS, 3, 1.0),
    (HAND_LOGITS, 6, 1.0),
    (RANDOM_LOGITS, 5, 1.0),
    (RANDOM_LOGITS, 8, 2.0),
])
def test_top_k(logits, k, temperature):
    tokens = _draw(logits, top_k=k, temperature=temperature)
    p = _softmax(logits / temperature)
    keep = _top_k_set(p, k)
    assert np.all(keep[tokens]), "sampled a token outside the top-k"
    assert set(np.unique(tokens)) == set(np.flatnonzero(keep))
    expected = _restrict(p, keep)
    _check_distribution(tokens, expected, {
        "uniform over top-k": _uniform(keep),
        "no top-k masking": p,
        "temperature ignored": _restrict(_softmax(logits), _top_k_set(_softmax(logits), k))
        if temperature != 1.0 else _uniform(keep),
    })


@pytest.mark.parametrize("k", [-1, 0, V, V + 7])
def test_top_k_disabled_values_keep_full_vocab(k):
    tokens = _draw(HAND_LOGITS, top_k=k, seed=5)
    _check_distribution(tokens, _softmax(HAND_LOGITS), {"top-4": _restrict(
        _softmax(HAND_LOGITS), _top_k_set(_softmax(HAND_LOGITS), 4))})


def test_top_k_one_is_argmax():
    tokens = _draw(RANDOM_LOGITS, top_k=1, temperature=5.0)
    assert np.all(tokens == RANDOM_LOGITS.argmax())


# ---------------------------------------------------------------- top-p


@pytest.mark.parametrize("logits,top_p,temperature", [
    (HAND_LOGITS, 0.7, 1.0),  # nucleus = the 0.30, 0.20, 0.15, 0.10 tokens
    (HAND_LOGITS, 0.45, 1.0),  # 0.30, 0.20
    (HAND_LOGITS, 0.9, 1.0),
    (RANDOM_LOGITS, 0.8, 1.0),
    (RANDOM_LOGITS, 0.8, 1.5),  # the nucleus is taken after temperature scaling
])
def test_top_p(logits, top_p, temperature):
    tokens = _draw(logits, top_p=top_p, temperature=temperature)
    p = _softmax(logits / temperature)
    keep = _nucleus(p, top_p)
    assert np.all(keep[tokens]), "sampled a token outside the nucleus"
    assert set(np.unique(tokens)) == set(np.flatnonzero(keep)), "nucleus token never drawn"
    expected = _restrict(p, keep)
    smaller = keep.copy()
    smaller[np.flatnonzero(keep)[np.argmin(p[keep])]] = False  # off-by-one nucleus
    alternatives = {"uniform over nucleus": _uniform(keep), "no top-p masking": p,
                    "nucleus one token short": _restrict(p, smaller)}
    # A wrong answer too close to tell by TV is still caught by the support checks above.
    far = {name: alt for name, alt in alternatives.items()
           if _tv(alt, expected) > 2 * _tv_bound(expected)}
    assert "uniform over nucleus" in far
    _check_distribution(tokens, expected, far)


def test_tiny_top_p_keeps_only_the_top_token():
    tokens = _draw(RANDOM_LOGITS, top_p=1e-6, temperature=3.0)
    assert np.all(tokens == RANDOM_LOGITS.argmax())


def test_top_p_one_keeps_the_tail_next_to_top_k_rows():
    """top_p = 1 disables top-p even when float32 cumulative mass reaches 1.0 early.

    (The sort path runs whenever any row of the batch uses top-k/top-p, so a row with both
    off must come out unmasked, else its draws would depend on its batch neighbours.)
    """
    logits = np.zeros((2, 64), np.float32)
    logits[:, 0] = 25.0  # tail mass ~1e-9: float32 cumsum hits 1.0 after the first token
    sampling = _tensors(2, top_p=1.0, top_k=np.array([0, 0]))
    sampling = sampling._replace(top_k=jnp.asarray([0, 3], jnp.int32))
    masked = np.asarray(jax.jit(_apply_top_k_top_p)(jnp.asarray(logits), sampling))
    assert np.all(np.isfinite(masked[0])), "top_p=1, top_k=0 must not mask anything"
    # Row 1: top-3 with all tail tokens tied keeps the ties, never fewer than 3.
    assert np.isfinite(masked[1]).sum() >= 3


# ---------------------------------------------------------------- min-p


@pytest.mark.parametrize("logits,min_p,temperature", [
    (HAND_LOGITS, 0.3, 1.0),  # cutoff 0.09: keeps 0.30, 0.20, 0.15, 0.10
    (HAND_LOGITS, 0.6, 1.0),  # cutoff 0.18: keeps 0.30, 0.20
    (RANDOM_LOGITS, 0.05, 1.0),
    (RANDOM_LOGITS, 0.2, 2.0),  # min-p is taken after temperature scaling
])
def test_min_p(logits, min_p, temperature):
    tokens = _draw(logits, min_p=min_p, temperature=temperature)
    p = _softmax(logits / temperature)
    keep = p >= min_p * p.max()
    assert np.min(np.abs(p / p.max() - min_p)) > 1e-3  # no boundary ambiguity
    assert np.all(keep[tokens]), "sampled a token below min_p * max_prob"
    assert set(np.unique(tokens)) == set(np.flatnonzero(keep))
    expected = _restrict(p, keep)
    alternatives = {"uniform over kept": _uniform(keep), "no min-p masking": p}
    _check_distribution(tokens, expected, alternatives)


# ---------------------------------------------------------------- top-k + top-p


def test_top_k_then_top_p():
    """vLLM/HF order: top-k first, then top-p over the renormalized top-k distribution.

    HAND top-4 = 0.30, 0.20, 0.15, 0.10 -> renormalized 0.40, 0.27, 0.20, 0.13; top_p 0.8
    keeps 3 tokens. Top-p over the full distribution (0.30+0.20+0.15+0.10 = 0.75 < 0.8)
    would keep 5, cut to 4 by top-k.
    """
    p = _softmax(HAND_LOGITS)
    top4 = _top_k_set(p, 4)
    keep = _nucleus(_restrict(p, top4), 0.8)
    assert keep.sum() == 3
    wrong_order = _nucleus(p, 0.8) & top4
    assert wrong_order.sum() == 4
    tokens = _draw(HAND_LOGITS, top_k=4, top_p=0.8)
    assert np.all(keep[tokens]), "top-p must apply to the renormalized top-k distribution"
    assert set(np.unique(tokens)) == set(np.flatnonzero(keep))
    _check_distribution(tokens, _restrict(p, keep), {
        "top-p before top-k": _restrict(p, wrong_order),
        "uniform": _uniform(keep),
    })


def test_top_k_tighter_than_top_p():
    p = _softmax(RANDOM_LOGITS)
    keep = _top_k_set(p, 2)
    assert _nucleus(p, 0.95).sum() > 2
    tokens = _draw(RANDOM_LOGITS, top_k=2, top_p=0.95)
    assert np.all(keep[tokens])
    _check_distribution(tokens, _restrict(p, keep), {"uniform": _uniform(keep)})


# ---------------------------------------------------------------- per-request keys


def _random_batch(rng, batch):
    logits = rng.normal(size=(batch, V)).astype(np.float32) * 2
    tensors = _tensors(
        batch,
        temperature=rng.choice([0.0, 0.5, 1.0, 2.0], size=batch),
        top_p=rng.choice([1.0, 0.9, 0.5], size=batch),
        top_k=rng.choice([0, 0, 3, 10], size=batch),
        min_p=rng.choice([0.0, 0.0, 0.1], size=batch),
        seed=rng.integers(0, 2**63, size=batch, dtype=np.uint64),
        sample_index=rng.integers(0, 1000, size=batch),
    )
    return logits, tensors


@pytest.mark.parametrize("row_params", [
    dict(temperature=1.0),  # no top-k/top-p: alone it skips the sort path, in a batch it doesn't
    dict(temperature=1.3, top_k=6),
    dict(temperature=0.9, top_p=0.85, min_p=0.02),
])
def test_draw_depends_only_on_seed_index_and_logits(row_params):
    rng = np.random.default_rng(7)
    row_logits = (rng.normal(size=V) * 1.0).astype(np.float32)
    tokens_alone = []
    for trial in range(50):
        seed = int(rng.integers(0, 2**63))
        index = int(rng.integers(0, 500))
        alone = _tensors(1, seed=seed, sample_index=index, **row_params)
        token_alone = int(_sample(jnp.asarray(row_logits[None]), alone)[0])

        logits, tensors = _random_batch(rng, 16)
        logits[5] = row_logits
        own = _tensors(16, seed=seed, sample_index=index, **row_params)
        tensors = SamplingTensors(*[
            field if field is None else field.at[5].set(own_field[5])
            for field, own_field in zip(tensors, own)])
        if trial % 2:  # half the time, no other row needs the top-k/top-p sort
            tensors = tensors._replace(top_k=jnp.where(jnp.arange(16) == 5, tensors.top_k, 0),
                                       top_p=jnp.where(jnp.arange(16) == 5, tensors.top_p, 1.0))
        token_in_batch = int(_sample(jnp.asarray(logits), tensors)[5])
        assert token_alone == token_in_batch, f"trial {trial}: batch changed the draw"
        tokens_alone.append(token_alone)
    # Different seeds give different draws.
    assert len(set(tokens_alone)) >= 4


def test_seed_and_index_change_the_draw():
    logits = jnp.asarray(np.zeros((1, V), np.float32))  # uniform: each draw is a fresh key

    def draw(seed, index):
        return int(_sample(logits, _tensors(1, seed=seed, sample_index=index))[0])

    # Same (seed, index) -> same token.
    assert all(draw(42, 3) == draw(42, 3) for _ in range(3))
    by_seed = [draw(s, 0) for s in range(50)]
    assert len(set(by_seed)) > 10
    by_index = [draw(42, i) for i in range(50)]
    assert len(set(by_index)) > 10
    # Both 32-bit words of the 64-bit seed matter.
    by_high_word = [draw(s << 32, 0) for s in range(1, 51)]
    assert len(set(by_high_word)) > 10
