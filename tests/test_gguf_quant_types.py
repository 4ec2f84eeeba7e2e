"""GGUF tensor types: every type loads to exactly gguf's dequantization of the file's data,
and the engine runs greedy on it."""

import numpy as np
import pytest

from pagedjax import LLM, SamplingParams
from pagedjax.loading import load_gguf
from tests.helpers.engines import TINY_ENGINE_SETTINGS
from tests.helpers.tiny_gguf import llama_cpp_permute, make_tiny_llama_gguf
from tests.helpers.tiny_models import make_tiny_llama

# What gguf-py quantizes, then the K-quants (random blocks: gguf-py cannot quantize them).
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

# GGUF per-layer tensor -> (params leaf, which block of rows: "q"/"k"/"v"/"gate"/"up"/None)
_LAYER = {"attn_norm.weight": ("attn_norm", None), "attn_q.weight": ("wqkv", "q"),
          "attn_k.weight": ("wqkv", "k"), "attn_v.weight": ("wqkv", "v"),
          "attn_output.weight": ("wo", None), "ffn_norm.weight": ("mlp_norm", None),
          "ffn_gate.weight": ("w_gate_up", "gate"), "ffn_up.weight": ("w_gate_up", "up"),
          "ffn_down.weight": ("w_down", None)}
_TOP = {"token_embd.weight": "embed", "output_norm.weight": "final_norm",
        "output.weight": "lm_head"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Rows of 256 values, so that K-quants (super-blocks of 256) fit every matrix.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_256"), num_kv_heads=2,
                           tie=False, hidden_size=256, intermediate_size=256)


def _unpermute(w, heads):
    order = llama_cpp_permute(np.arange(w.shape[0])[:, None], heads)[:, 0]
    out = np.empty_like(w)
    out[order] = w
    return out


def _expected_slice(params, config, name):
    if name in _TOP:
        return params[_TOP[name]]
    _, layer, rest = name.split(".", 2)
    leaf, part = _LAYER[rest]
    target = params["layers"][leaf][int(layer)]
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    f = config.intermediate_size
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, f),
            "up": (f, 2 * f), None: (0, target.shape[0])}[part]
    return target[rows[0]:rows[1]]


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_type_loads_to_the_dequantized_data(tiny_dir, tmp_path, qtype):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = make_tiny_llama_gguf(tiny_dir, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    config, params, tokenizer = load_gguf(path)
    reader = GGUFReader(path)
    types = set()
    for tensor in reader.tensors:
        types.add(tensor.tensor_type.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        want = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if ".attn_q." in tensor.name:
            want = _unpermute(want, config.num_heads)
        elif ".attn_k." in tensor.name:
            want = _unpermute(want, config.num_kv_heads)
        got = _expected_slice(params, config, tensor.name)
        np.testing.assert_array_equal(got, want, err_msg=tensor.name)
    assert types == ({"F32"} if qtype == "F32" else {"F32", qtype})  # norms stay F32

    llm = LLM(path, **TINY_ENGINE_SETTINGS)
    out = llm.generate(["the cat and the hat"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8
    again = LLM.from_params(params, config, tokenizer, **TINY_ENGINE_SETTINGS)
    assert again.generate(["the cat and the hat"], GREEDY,
                          use_tqdm=False)[0].outputs[0].token_ids == out.token_ids


def test_chunked_dequantization_equals_whole(tiny_dir, tmp_path, monkeypatch):
    from pagedjax.loading import gguf_tensors

    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "tiny.gguf", qtype="Q4_K")
    _, whole, _ = load_gguf(path)
    monkeypatch.setattr(gguf_tensors, "_DEQUANT_CHUNK_BYTES", 3000)  # a few rows per chunk
    _, chunked, _ = load_gguf(path)
    for key in ("embed", "lm_head"):
        np.testing.assert_array_equal(chunked[key], whole[key])
    for key, value in whole["layers"].items():
        np.testing.assert_array_equal(chunked["layers"][key], value, err_msg=key)
