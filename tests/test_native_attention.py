"""The native CPU attention backend: whole steps against the dense oracle, its C++
decode-row kernel against the jnp backend's rows, its build cache, and its fallbacks."""

import ctypes
import os
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pagedjax import SamplingParams
from pagedjax.kernels import native_attention, native_build, resolve_attention_backend
from pagedjax.kernels.backend import get_paged_attention
from pagedjax.kernels.paged_context import PagedContext
from pagedjax.kernels.softmax_parts import soft_cap_fn
from tests.helpers.engines import make_llm
from tests.test_jnp_attention import STEPS, check_step

POISON = 1e4  # pages no row may read: a wrong page read shows up as a huge error
# The kernel is built by the system C++ compiler; without one only the fallback is tested.
needs_compiler = pytest.mark.skipif(native_build.find_compiler() is None,
                                    reason="no C++ compiler on this machine")


@needs_compiler
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 1)])
def test_steps_match_dense_attention(num_heads, num_kv_heads, step):
    """Whole steps (decodes, chunks, the per-token path) through the native backend, with
    head dim 8 and 4-token pages (the kernel's 4-float vectors)."""
    check_step(STEPS[step], num_heads, num_kv_heads,
               attention=native_attention.paged_attention)


@needs_compiler
@pytest.mark.parametrize("window,soft_cap", [(7, None), (None, 2.0), (20, 1.5)])
def test_sliding_window_and_soft_cap(window, soft_cap):
    for step in ("long_contexts", "many_decodes", "many_tokens", "two_chunks"):
        check_step(STEPS[step], 6, 2, window=window, soft_cap=soft_cap,
                   attention=native_attention.paged_attention)


def make_rows(group, head_dim, page_size, lens, *, num_kv_heads=3, layer=1, seed=0):
    """Decode rows over scattered pages of a pool whose other pages (and other layer)
    hold POISON; returns (q [R, K, G, D], tables [R, M], lens [R], k_cache, v_cache)."""
    rng = np.random.default_rng(seed)
    pages = [-(-n // page_size) for n in lens]
    num_pages = sum(pages) + 3
    free = list(rng.permutation(np.arange(1, num_pages)))
    width = max(pages) + 2
    tables = np.zeros((len(lens), width), np.int32)  # columns past a context: page 0
    k_cache = np.full((2, num_pages, num_kv_heads, head_dim, page_size), POISON, np.float32)
    v_cache = np.full((2, num_pages, page_size, num_kv_heads, head_dim), POISON, np.float32)
    for r, n in enumerate(lens):
        for j in range(pages[r]):
            page = free.pop()
            tables[r, j] = page
            keys = min(page_size, n - j * page_size)  # the page's tail stays POISON
            k_cache[layer, page, :, :, :keys] = rng.standard_normal(
                (num_kv_heads, head_dim, keys))
            v_cache[layer, page, :keys] = rng.standard_normal((keys, num_kv_heads, head_dim))
    q = rng.standard_normal((len(lens), num_kv_heads, group, head_dim)).astype(np.float32)
    q *= head_dim ** -0.5
    return (jnp.asarray(q), jnp.asarray(tables), jnp.asarray(np.asarray(lens, np.int32)),
            jnp.asarray(k_cache), jnp.asarray(v_cache))


# SmolLM2's shapes (register-wide vectors), Llama 3's, and odd ones (scalar lanes).
@needs_compiler
@pytest.mark.parametrize("group,head_dim,page_size", [(3, 64, 64), (4, 128, 16), (2, 5, 3)])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (70, None), (None, 30.0)])
def test_rows_match_jnp_rows(group, head_dim, page_size, window, soft_cap):
    """The kernel's unnormalised softmax against PagedContext.attend_rows: empty rows,
    partial and whole last pages, a context past the window; rows unsorted; and a chunk's
    rows (one sequence's pages, successive positions) that the kernel walks together."""
    lens = [0, 1, page_size - 1, page_size, page_size + 1, 3 * page_size + 5, 150, 2]
    q, tables, lens, k_cache, v_cache = make_rows(group, head_dim, page_size, lens)
    chunk = 20  # more rows than the kernel groups at once
    chunk_q = np.random.default_rng(1).standard_normal((chunk,) + q.shape[1:]) * 0.3
    q = jnp.concatenate([q, jnp.asarray(chunk_q, jnp.float32)])
    tables = jnp.concatenate([tables, jnp.repeat(tables[5:6], chunk, axis=0)])
    positions = jnp.concatenate([lens, lens[5] + jnp.arange(chunk, dtype=jnp.int32)])
    lens = jnp.concatenate([lens, jnp.repeat(lens[5:6], chunk)])
    layer = jnp.int32(1)
    cap = soft_cap_fn(soft_cap)

    @jax.jit
    def both(q, tables, lens, positions, k_cache, v_cache):
        want = PagedContext(k_cache, v_cache, layer, cap, window).attend_rows(
            q, tables, lens, positions)
        got = native_attention.decode_rows(q, tables, lens, positions, k_cache=k_cache,
                                           v_cache=v_cache, layer=layer,
                                           sliding_window=window, soft_cap=soft_cap)
        return want, got

    want, got = both(q, tables, lens, positions, k_cache, v_cache)
    (want_max, want_total, want_out), (got_max, got_total, got_out) = want, got
    assert got_out.shape == want_out.shape and got_max.shape == want_max.shape
    seen = np.asarray(want_total) > 0
    np.testing.assert_allclose(np.asarray(got_total) > 0, seen)
    assert not seen[:, 0].any()  # the empty row
    np.testing.assert_allclose(np.asarray(got_max)[seen], np.asarray(want_max)[seen],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_total), np.asarray(want_total),
                               rtol=1e-5, atol=1e-5)
    normalised = [np.asarray(out)[seen] / np.asarray(total)[seen][:, None]
                  for out, total in ((got_out, got_total), (want_out, want_total))]
    np.testing.assert_allclose(*normalised, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_page_outside_the_pool_is_an_error():
    q, tables, lens, k_cache, v_cache = make_rows(3, 64, 64, [70, 10])
    tables = tables.at[0, 1].set(k_cache.shape[1])  # one past the last page
    with pytest.raises(Exception, match="outside the KV pool"):
        jax.block_until_ready(native_attention.decode_rows(
            q, tables, lens, lens, k_cache=k_cache, v_cache=v_cache, layer=jnp.int32(1),
            sliding_window=None, soft_cap=None))


@needs_compiler
def test_build_is_cached_per_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_NATIVE_DIR", str(tmp_path))
    source, defines = native_attention.SOURCE, {"GROUP": 1, "HEAD_DIM": 8, "PAGE_SIZE": 8}
    library = native_build.build_library(source, defines)
    assert os.path.exists(library) and library.startswith(str(tmp_path))

    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(native_build.subprocess, "run",
                        lambda command, **kw: commands.append(command) or real_run(command, **kw))
    assert native_build.build_library(source, defines) == library
    assert all("-o" not in command for command in commands)  # found, not compiled again
    other = native_build.build_library(source, {**defines, "PAGE_SIZE": 16})
    assert other != library and os.path.exists(other)
    assert any("-o" in command for command in commands)
    assert not [p for p in tmp_path.rglob("*.partial")]


@needs_compiler
def test_editing_a_header_beside_the_source_rebuilds(tmp_path, monkeypatch):
    """Kernels share kernels/parallel_items.h: a header edit must not load a stale build."""
    monkeypatch.setenv("PAGEDJAX_NATIVE_DIR", str(tmp_path / "builds"))
    (tmp_path / "shared.h").write_text("constexpr int kAnswer = 1;\n")
    source = tmp_path / "kernel.cc"
    source.write_text('#include "shared.h"\nextern "C" int answer() { return kAnswer; }\n')
    first = native_build.build_library(str(source), {})
    (tmp_path / "shared.h").write_text("constexpr int kAnswer = 2;\n")
    second = native_build.build_library(str(source), {})
    assert first != second
    assert ctypes.CDLL(second).answer() == 2


@needs_compiler
def test_compiler_errors_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_NATIVE_DIR", str(tmp_path))
    with pytest.raises(native_build.NativeBuildError, match="GROUP"):
        native_build.build_library(native_attention.SOURCE, {"HEAD_DIM": 8, "PAGE_SIZE": 8})
    assert not [p for p in tmp_path.rglob("*.partial")]


def test_no_compiler_falls_back_to_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native_attention.load_decode_attention.cache_clear()
    try:
        for name in ("auto", "native"):
            with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
                assert resolve_attention_backend(name, "cpu", head_dim=24, block_size=8,
                                                 dtype=jnp.float32, group=7) == "reference"
    finally:
        native_attention.load_decode_attention.cache_clear()


@needs_compiler
def test_backend_resolution():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention_backend("auto", "cpu", head_dim=64, block_size=64,
                                         dtype=jnp.float32, group=3) == "native"
        assert resolve_attention_backend("native", "cpu") == "native"
        assert resolve_attention_backend("auto", "cpu", head_dim=64, block_size=64,
                                         dtype=jnp.bfloat16, group=3) == "native"
    with pytest.warns(UserWarning, match="float16"):
        assert resolve_attention_backend("auto", "cpu", head_dim=64, block_size=64,
                                         dtype=jnp.float16, group=3) == "reference"
    with pytest.warns(UserWarning, match="XLA CPU kernel"):
        assert resolve_attention_backend("native", "gpu", head_dim=64, block_size=16,
                                         dtype=jnp.bfloat16, group=3) == "reference"
    assert get_paged_attention("native") is native_attention.paged_attention


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The quick brown fox jumps over the lazy dog, then runs far away.", "Hi"]


@needs_compiler
@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_engine_matches_reference_greedy_tokens(tiny_llama_dir, num_scheduler_steps,
                                                monkeypatch):
    """A chunked prefill that reads its own context and decodes over page boundaries."""
    calls = []
    kernel = native_attention.decode_rows
    monkeypatch.setattr(native_attention, "decode_rows",
                        lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    results = {}
    for backend in ("reference", "native"):
        llm = make_llm(tiny_llama_dir, attention_backend=backend, max_num_batched_tokens=16,
                       num_scheduler_steps=num_scheduler_steps)
        assert llm.engine.attention_backend == backend
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        results[backend] = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(tokens) == 12 for tokens in results["reference"])
    assert results["native"] == results["reference"]
    assert calls  # the engine really ran the kernel


@needs_compiler
def test_one_token_steps_match_the_reference(tiny_llama_dir):
    """CPU's default 1-token buckets: a sequence decoding alone runs 1-token steps (the
    native kernel, the in-place 1-token KV write) and gives the reference backend's
    tokens from its 16-token steps."""
    reference = make_llm(tiny_llama_dir, attention_backend="reference")
    want = reference.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    llm = make_llm(tiny_llama_dir, min_token_bucket=None)  # the platform's default
    assert llm.engine.buckets.tokens[0] == 1
    got = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert list(got[0].outputs[0].token_ids) == list(want[0].outputs[0].token_ids)
    assert any(key.num_tokens == 1 for key in llm.engine.runner.compiled_keys)
