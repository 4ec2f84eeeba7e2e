"""The small-row CPU matmul kernel: products against numpy (row and column tails), its
gradient, where `linear` calls it, and the engine turning it on with the native backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax.kernels import native_build, small_matmul as small_matmul_module
from pagedjax.kernels.small_matmul import small_matmul
from pagedjax.models.layers import LayerMatrix, StackedMatrix, linear

needs_compiler = pytest.mark.skipif(native_build.find_compiler() is None,
                                    reason="no C++ compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11, 16, 19])
@pytest.mark.parametrize("out_features,in_features", [(130, 13), (64, 576), (5, 8)])
def test_products_match_numpy(rows, out_features, in_features):
    """Odd output counts (not a multiple of the weight rows read together nor of the
    rows a work item takes, a multiple of 8), input lengths with a scalar tail,
    and every way x rows are grouped (1-8 rows in one pass, more in blocks of 8 and a
    tail)."""
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    got = np.asarray(jax.jit(small_matmul)(x, w))
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-5, atol=1e-4)


@needs_compiler
def test_gradient_is_the_dots_gradient():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
    got = jax.grad(loss(small_matmul), argnums=(0, 1))(x, w)
    want = jax.grad(loss(lambda x, w: x @ w.T), argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_linear_calls_the_kernel_up_to_small_rows():
    """Inputs of 2 to `small_rows` rows (leading dims flattened) go to the kernel, others
    (and small_rows=0) to XLA's dot; per-layer matrices too, with the bias added."""
    w = jnp.ones((16, 8), jnp.float32)
    b = jnp.arange(16, dtype=jnp.float32)

    def uses_kernel(x, weight, small_rows):
        hlo = jax.jit(lambda x: linear(x, weight, b, small_rows)).lower(x).as_text()
        return "pagedjax_small_matmul" in hlo
    assert uses_kernel(jnp.ones((2, 2, 8)), w, 4)
    assert not uses_kernel(jnp.ones((5, 8)), w, 4)
    assert not uses_kernel(jnp.ones((1, 8)), w, 4)  # one row: XLA's own dot is as fast
    assert not uses_kernel(jnp.ones((2, 8)), w, 0)
    per_layer = LayerMatrix((w, 2 * w), jnp.int32(1))
    assert uses_kernel(jnp.ones((3, 8)), per_layer, 8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8)), jnp.float32)
    np.testing.assert_allclose(np.asarray(linear(x, per_layer, b, 8)),
                               np.asarray(x @ (2 * w).T + b), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_engine_turns_it_on_with_the_native_backend(tiny_llama_dir):
    from pagedjax import SamplingParams
    from tests.helpers.engines import make_llm, token_ids

    native = make_llm(tiny_llama_dir, attention_backend="native")
    reference = make_llm(tiny_llama_dir, attention_backend="reference")
    assert native.engine.step_config.small_matmul_rows == small_matmul_module.MAX_ROWS
    assert reference.engine.step_config.small_matmul_rows == 0
    assert native.engine.model_config.small_matmul_rows == 0  # the user's config untouched
    prompts = [[5, 17, 42, 99, 7, 3, 250], [8, 9, 10, 11, 12], [3, 4]]  # 3 rows: the kernel
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    assert token_ids(native.generate(prompts, greedy, use_tqdm=False)) == token_ids(
        reference.generate(prompts, greedy, use_tqdm=False))


@needs_compiler
def test_bfloat16_weights_are_read_where_they_lie_and_summed_in_float32():
    """bf16 x and w: bitwise the float32 kernel on the widened values, rounded once to
    bf16, for every row grouping; `linear` sends bf16 inputs of 1 to small_rows rows to it
    (1 row too: XLA's bf16 matrix-vector product is slow), other sizes to XLA's dot."""
    from pagedjax.kernels.small_matmul import small_matmul_bf16

    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((70, 64)), jnp.bfloat16)  # [O, I]
    for rows in (1, 3, 8, 11):
        x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.bfloat16)  # [R, I]
        got = jax.jit(small_matmul_bf16)(x, w)
        want = jax.jit(small_matmul)(x.astype(jnp.float32), w.astype(jnp.float32))
        assert got.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(got.astype(jnp.float32)),
                              np.asarray(want.astype(jnp.bfloat16).astype(jnp.float32))), rows

    def uses_kernel(x, small_rows):
        hlo = jax.jit(lambda x: linear(x, w, small_rows=small_rows)).lower(x).as_text()
        return "pagedjax_small_matmul_layer_bf16" in hlo
    assert uses_kernel(jnp.ones((1, 64), jnp.bfloat16), 16)
    assert not uses_kernel(jnp.ones((17, 64), jnp.bfloat16), 16)
    assert not uses_kernel(jnp.ones((1, 64), jnp.float16), 16)


@needs_compiler
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_matrix_is_read_in_place_up_to_small_rows(dtype):
    """A trainer's stacked [L, out, in] matrix inside the layer scan: 1..MAX_STACKED_ROWS
    float32 rows (bfloat16: small_rows) read the chosen layer in the kernel (no slice),
    more rows take XLA's dot of the slice, and none with small_rows=0; all give
    x @ w[layer].T (bfloat16: summed in float32, rounded once)."""
    rng = np.random.default_rng(5)
    stacked = jnp.asarray(rng.standard_normal((3, 40, 64)), dtype)
    b = jnp.arange(40, dtype=dtype)
    w = StackedMatrix(stacked, jnp.int32(2))
    limit = small_matmul_module.MAX_STACKED_ROWS if dtype == jnp.float32 else 16
    for rows, small_rows, kernel in ((1, 16, True), (limit, 16, True), (limit + 1, 16, False),
                                     (2, 0, False)):
        x = jnp.asarray(rng.standard_normal((rows, 64)), dtype)
        fn = jax.jit(lambda x: linear(x, w, b, small_rows=small_rows))
        assert ("pagedjax_small_matmul_layer" in fn.lower(x).as_text()) == kernel, rows
        want = (np.asarray(x, np.float64) @ np.asarray(stacked[2], np.float64).T
                + np.asarray(b, np.float64))
        tol = 1e-4 if dtype == jnp.float32 else 0.1
        np.testing.assert_allclose(np.asarray(fn(x), np.float64), want, rtol=tol, atol=tol)


@needs_compiler
def test_engine_reads_a_trainers_stacked_params_in_place(tiny_llama_dir, monkeypatch):
    """Device-array params (kept stacked, never copied apart) reach the kernel as
    StackedMatrix products; tokens equal the reference backend's on the same arrays."""
    from pagedjax import LLM, SamplingParams
    from pagedjax.loading import load_model
    from pagedjax.models import SUPPORTED_ARCHITECTURES
    from tests.helpers.engines import TINY_ENGINE_SETTINGS, token_ids

    config, params, tokenizer = load_model(str(tiny_llama_dir),
                                           supported_architectures=SUPPORTED_ARCHITECTURES)
    params = jax.device_put(params)
    calls = []
    kernel = small_matmul_module.small_matmul_layer
    monkeypatch.setattr(small_matmul_module, "small_matmul_layer",
                        lambda *a: calls.append(a[1].shape) or kernel(*a))
    outputs = {}
    for backend in ("native", "reference"):
        llm = LLM.from_params(params, config, tokenizer, attention_backend=backend,
                              **TINY_ENGINE_SETTINGS)
        assert not llm.engine.per_layer_matrices
        prompts = [[5, 17, 42, 99, 7, 3, 250], [8, 9, 10, 11, 12], [3, 4]]
        greedy = SamplingParams(max_tokens=6, temperature=0.0)
        outputs[backend] = token_ids(llm.generate(prompts, greedy, use_tqdm=False))
    assert outputs["native"] == outputs["reference"]
    assert calls and all(len(shape) == 3 for shape in calls)  # whole stacks, traced
