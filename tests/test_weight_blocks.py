"""Block-encoded weights: exact encodings of quantized-GGUF (or bfloat16) float32
matrices, the small-matmul kernel reading them bitwise like the float32 matrix, and the
engine keeping them only for the weights they were encoded from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.kernels import exact_blocks, native_build
from pagedjax.kernels.small_matmul import (MAX_BLOCK_ROWS, BlockMatrix, small_matmul,
                                           small_matmul_blocks)
from pagedjax.loading import load_gguf
from pagedjax.models.layers import linear
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, token_ids
from tests.helpers.tiny_gguf import make_tiny_llama_gguf
from tests.helpers.tiny_models import make_tiny_llama

needs_compiler = pytest.mark.skipif(native_build.find_compiler() is None,
                                    reason="no C++ compiler on this machine")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def gguf_values(qtype: str, shape: tuple, seed: int) -> np.ndarray:
    """A float32 matrix as a loader returns it: gguf-py's quantization of random values,
    dequantized ("BF16": random values rounded to bfloat16, as a bf16 checkpoint's)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if qtype == "BF16":
        return np.array(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    kind = GGMLQuantizationType[qtype]
    return dequantize(quantize(x, kind), kind).reshape(shape)


@pytest.mark.parametrize("qtype,fmt,constant", [("Q4_1", exact_blocks.Q4_1, 0.25),
                                                ("Q8_0", exact_blocks.Q8_0, 0.0),
                                                ("BF16", exact_blocks.BF16, 0.25)])
def test_quantized_values_encode_exactly_and_nothing_else_does(qtype, fmt, constant):
    w = gguf_values(qtype, (24, 96), seed=1)
    w[3, 32:64] = constant  # a block with d = 0
    got_format, blocks = exact_blocks.encode_exactly(w)
    assert got_format == fmt
    assert blocks.shape == (24, 3 * exact_blocks.BLOCK_BYTES[fmt])
    assert np.array_equal(exact_blocks.decode(fmt, blocks).view(np.uint32), w.view(np.uint32))
    nudged = w.copy()
    nudged[5, 7] = np.nextafter(nudged[5, 7], np.float32(np.inf))
    assert exact_blocks.encode_exactly(nudged) is None
    assert exact_blocks.encode_exactly(w[:, :48].copy()) is None  # rows not whole blocks
    assert exact_blocks.encode_exactly(
        np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)) is None


@needs_compiler
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "BF16"])
def test_kernel_reads_the_blocks_while_current_and_the_matrix_after(qtype):
    """Outputs bitwise those of the float32 kernel on the encoded values for every row
    grouping; with the flag cleared, the dense matrix (here a different one) is read."""
    encoded = gguf_values(qtype, (70, 64), seed=3)
    fmt, blocks = exact_blocks.encode_exactly(encoded)
    other = np.random.default_rng(4).standard_normal((70, 64)).astype(np.float32)
    for rows in (1, 2, 3, 8, 11, 19):
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        for current, want in ((True, encoded), (False, other)):
            m = BlockMatrix(jnp.asarray(other), jnp.asarray(blocks), jnp.asarray(current), fmt)
            got = np.asarray(jax.jit(small_matmul_blocks)(x, m))
            expected = np.asarray(jax.jit(small_matmul)(x, want))
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (rows,
                                                                                 current)
    # `linear` hands a BlockMatrix to the kernel from one row up to MAX_BLOCK_ROWS (past
    # small_rows), to XLA beyond, and never with small_rows=0.
    m = BlockMatrix(jnp.asarray(other), jnp.asarray(blocks), jnp.asarray(True), fmt)

    def uses_kernel(rows, small_rows):
        hlo = jax.jit(lambda x: linear(x, m, small_rows=small_rows)).lower(
            jnp.ones((rows, 64))).as_text()
        return "pagedjax_small_matmul_blocks" in hlo
    assert uses_kernel(MAX_BLOCK_ROWS, 16)
    assert not uses_kernel(MAX_BLOCK_ROWS + 1, 16)
    assert not uses_kernel(2, 0)
    x = np.random.default_rng(9).standard_normal((1, 64)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x: linear(x, m, small_rows=16))(x))
    assert np.array_equal(got, np.asarray(jax.jit(small_matmul)(x, encoded)))
    np.testing.assert_allclose(np.asarray(linear(x, m, small_rows=0)), x @ other.T,
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def q4_1_model(tmp_path_factory):
    """(path, config, params, tokenizer) of a tiny Llama GGUF with Q4_1 matrices and tied
    embeddings (the default model's shape: the logits matrix is the embedding)."""
    folder = tmp_path_factory.mktemp("q4_1")
    model_dir = make_tiny_llama(folder / "hf", num_kv_heads=2, tie=True,
                                intermediate_size=128)
    path = make_tiny_llama_gguf(model_dir, folder / "tiny-q4_1.gguf", qtype="Q4_1")
    return (path, *load_gguf(path))


@needs_compiler
def test_engine_decodes_from_blocks_and_drops_them_for_new_weights(q4_1_model):
    path, config, params, tokenizer = q4_1_model
    llm = LLM(path, attention_backend="native", **TINY_ENGINE_SETTINGS)
    blocks = llm.engine.weight_blocks
    assert blocks is not None and blocks.current and blocks.lm_head[0] == exact_blocks.Q4_1
    assert all(e is not None for per_layer in blocks.layers.values() for e in per_layer)
    reference = LLM(path, attention_backend="reference", **TINY_ENGINE_SETTINGS)
    assert reference.engine.weight_blocks is None
    before = token_ids(llm.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    assert before == token_ids(reference.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    # the steps read the tied logits matrix's blocks, not the float32 embedding (4x the
    # bytes); XLA prunes a program's unused params, so an unread one is absent
    runner = llm.engine.runner
    head_blocks = "u8[{},{}]".format(*blocks.lm_head[1].shape)
    assert all(head_blocks in runner.program_text(key) for key in runner.compiled_keys)

    compiles = llm.num_compiles
    rng = np.random.default_rng(5)
    new = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                       params)
    llm.update_params(new)
    assert not llm.engine.weight_blocks.current
    after = token_ids(llm.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    fresh = LLM.from_params(new, config, tokenizer, attention_backend="reference",
                            **TINY_ENGINE_SETTINGS)
    assert after == token_ids(fresh.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    assert after != before  # the old blocks would have given `before`
    assert llm.num_compiles == compiles


@needs_compiler
def test_a_bfloat16_engine_reads_its_own_params_not_float32_blocks(q4_1_model):
    """The blocks hold the float32 values: a bfloat16 engine on the same GGUF keeps none
    and runs its few-row products in the kernel's bfloat16 path on its rounded params
    (its outputs stay bfloat16 through the layers), agreeing with XLA's bf16 products."""
    path = q4_1_model[0]
    llm = LLM(path, dtype="bfloat16", attention_backend="native", **TINY_ENGINE_SETTINGS)
    assert llm.engine.weight_blocks is None
    assert llm.engine.step_config.small_matmul_rows > 0
    got = token_ids(llm.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    xla = LLM(path, dtype="bfloat16", attention_backend="reference", **TINY_ENGINE_SETTINGS)
    assert xla.engine.step_config.small_matmul_rows == 0
    want = token_ids(xla.generate(TINY_PROMPTS, GREEDY, use_tqdm=False))
    agree = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert agree >= 0.75 * sum(len(w) for w in want)
