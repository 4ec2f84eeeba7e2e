"""GGUF loading: the default SmolLM2 file against transformers' GGUF loader, and tiny
converted checkpoints against the same weights loaded from safetensors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pagedjax.loading import default_gguf_path, load_gguf, load_hf_checkpoint
from tests.helpers.tiny_gguf import make_tiny_llama_gguf
from tests.helpers.tiny_models import make_tiny_llama

# Strings on which transformers' GGUF tokenizer and ours agree. transformers builds the
# SmolLM2 tokenizer without its Digits pre-tokenizer, so it differs on a digit that follows
# whitespace; those are checked separately below.
AGREEING_TEXTS = [
    "Hello world",
    "12345 67 and 3.14159, 1,000,000",
    "a1b2c3",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\n",
    "héllo wörld ñ 中文 日本語 한국어",
    "emoji 🤗🚀 👍🏽 🇫🇷",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "it's they're we'll I'M",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
]


@pytest.fixture(scope="session")
def gguf_path():
    return default_gguf_path()


@pytest.fixture(scope="session")
def ours(gguf_path):
    return load_gguf(gguf_path)


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    import transformers

    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    import transformers

    folder, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_smollm2_config(ours):
    config, params, tokenizer = ours
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and tokenizer.vocab_size == 49152
    assert config.tie_word_embeddings and "lm_head" not in params
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    assert config.rope_scaling.rope_type == "default"
    assert params["layers"]["wqkv"].shape == (30, (9 + 2 * 3) * 64, 576)
    assert params["embed"].dtype == np.float32


@pytest.mark.parametrize("layer", [0, 29])
def test_smollm2_tensors_match_transformers(ours, hf_gguf_model, layer):
    config, params, _ = ours
    sd, lp = hf_gguf_model, params["layers"]
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    f = config.intermediate_size
    pre = f"model.layers.{layer}."
    # q and k equal only if llama.cpp's row permutation was undone correctly.
    np.testing.assert_array_equal(lp["wqkv"][layer, :q], sd[pre + "self_attn.q_proj.weight"])
    np.testing.assert_array_equal(lp["wqkv"][layer, q:q + kv], sd[pre + "self_attn.k_proj.weight"])
    np.testing.assert_array_equal(lp["wqkv"][layer, q + kv:], sd[pre + "self_attn.v_proj.weight"])
    np.testing.assert_array_equal(lp["wo"][layer], sd[pre + "self_attn.o_proj.weight"])
    np.testing.assert_array_equal(lp["w_gate_up"][layer, :f], sd[pre + "mlp.gate_proj.weight"])
    np.testing.assert_array_equal(lp["w_gate_up"][layer, f:], sd[pre + "mlp.up_proj.weight"])
    np.testing.assert_array_equal(lp["w_down"][layer], sd[pre + "mlp.down_proj.weight"])
    np.testing.assert_array_equal(lp["attn_norm"][layer], sd[pre + "input_layernorm.weight"])
    np.testing.assert_array_equal(lp["mlp_norm"][layer], sd[pre + "post_attention_layernorm.weight"])


def test_smollm2_embedding_and_norm_match_transformers(ours, hf_gguf_model):
    _, params, _ = ours
    np.testing.assert_array_equal(params["embed"], hf_gguf_model["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"], hf_gguf_model["model.norm.weight"])


def test_smollm2_tokenizer_matches_transformers(ours, hf_gguf_tokenizer):
    tokenizer = ours[2]
    for text in AGREEING_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_gguf_tokenizer.encode(text), text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_gguf_tokenizer.decode(
                ids, skip_special_tokens=skip), text
    assert tokenizer.bos_token_id == hf_gguf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == hf_gguf_tokenizer.eos_token_id == 2
    assert tokenizer.eos_token_ids == frozenset({2})
    assert tokenizer.pad_token_id == hf_gguf_tokenizer.pad_token_id
    assert not tokenizer.add_bos_token
    assert tokenizer.special_token_ids == frozenset(range(17))


def test_smollm2_tokenizer_splits_digits_like_smollm2(ours, hf_gguf_tokenizer):
    # SmolLM2's tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) make every digit
    # its own pre-token before the byte-level regex, so "x  1" is x, "  ", 1. transformers'
    # GGUF tokenizer skips that step and gives x, " ", " ", 1.
    from tokenizers import Tokenizer, pre_tokenizers

    tokenizer = ours[2]
    assert tokenizer.encode("x  1") == [104, 256, 33]
    # A copy: the session-scoped HF tokenizer must stay as transformers built it.
    reference = Tokenizer.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    for text in AGREEING_TEXTS + ["x  1", "  12  ", "a\n\n7 b\t\t8"]:
        assert tokenizer.encode(text) == reference.encode(text).ids, text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(ours, hf_gguf_tokenizer, conversation,
                                                    add_generation_prompt):
    ours_text = ours[2].apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    hf_text = hf_gguf_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours_text == hf_text
    assert ours[2].encode(ours_text, add_special_tokens=False) == hf_gguf_tokenizer.encode(
        hf_text, add_special_tokens=False)


# -- tiny converted checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), num_kv_heads=2, tie=False)


@pytest.mark.parametrize("qtype,atol", [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 1e-2)])
def test_tiny_gguf_equals_safetensors(tiny_dir, tmp_path, qtype, atol):
    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "tiny.gguf", qtype=qtype)
    g_config, g_params, g_tok = load_gguf(path)
    h_config, h_params, h_tok = load_hf_checkpoint(tiny_dir)
    assert g_config == h_config
    for key in ("embed", "final_norm", "lm_head"):
        np.testing.assert_allclose(g_params[key], h_params[key], rtol=0, atol=atol)
    for key in h_params["layers"]:
        np.testing.assert_allclose(g_params["layers"][key], h_params["layers"][key],
                                   rtol=0, atol=atol, err_msg=key)
    text = "the cat <|im_start|> and 123  4 héllo"
    assert g_tok.encode(text) == h_tok.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert g_tok.apply_chat_template(chat) == h_tok.apply_chat_template(chat)


def test_bfloat16_params(tiny_dir, tmp_path):
    import ml_dtypes

    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "tiny.gguf", qtype="Q8_0")
    _, f32, _ = load_gguf(path)
    _, bf16, _ = load_gguf(path, dtype="bfloat16")
    assert bf16["layers"]["wqkv"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16["layers"]["wqkv"],
                                  f32["layers"]["wqkv"].astype(ml_dtypes.bfloat16))


def test_llama_bpe_pre_tokenizer_builds(tiny_dir, tmp_path):
    # Llama 3 files: the llama3 split regex and ignore_merges.
    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "tiny.gguf", pre="llama-bpe")
    _, _, tok = load_gguf(path)
    _, _, hf_tok = load_hf_checkpoint(tiny_dir)
    text = "the cat and the hat <|im_end|>"
    assert tok.encode(text) == hf_tok.encode(text)


def test_unsupported_architecture(tiny_dir, tmp_path):
    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "x.gguf", architecture="falcon")
    with pytest.raises(ValueError, match="GGUF architecture 'falcon' is not supported; "
                                         "supported: gemma, gemma2, gpt2, llama"):
        load_gguf(path)


def test_unsupported_tokenizer(tiny_dir, tmp_path):
    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "x.gguf", tokenizer_model="t5")
    with pytest.raises(ValueError, match="tokenizer.ggml.model='t5' is not supported"):
        load_gguf(path)
    path = make_tiny_llama_gguf(tiny_dir, tmp_path / "y.gguf", pre="some-new-model")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='some-new-model'"):
        load_gguf(path)


def test_unsupported_tensor_type_names_tensor():
    import gguf

    from pagedjax.loading.gguf_loader import _dequantize

    class FakeTensor:
        name = "blk.0.attn_q.weight"
        tensor_type = gguf.GGMLQuantizationType.I32
        data = np.zeros((4, 4), np.int32)
        shape = np.array([4, 4])

    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight has type I32"):
        _dequantize(FakeTensor())


def test_missing_file_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        load_gguf(bad)


# -- sentencepiece (tokenizer.ggml.model == "llama") --------------------------------------

_SP_PIECES = ["▁", "t", "h", "e", "a", "c", "n", "d", "o", "s", "i", "l", "w", "r",
              "▁t", "he", "▁the", "▁c", "at", "▁cat", "an", "▁an", "▁and", "▁a", "in",
              "▁in", "is", "▁is", "▁h", "▁hat", "ll", "ello", "▁w", "or", "ld", "▁wor", "▁world"]


def _write_sentencepiece_gguf(path):
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _SP_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(_SP_PIECES)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(_SP_PIECES))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from pagedjax.loading.gguf_loader import read_metadata
    from pagedjax.loading.gguf_tokenizer import tokenizer_from_gguf

    path = _write_sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = tokenizer_from_gguf(read_metadata(GGUFReader(str(path))))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == frozenset({2})
    for text in ["the cat and the hat", "hello world", " leading space", "a  b\n\nc",
                 "<s>the</s> cat", "Héllo 世界 🤗", ""]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ids[0] == 1
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip), text


def test_llama3_rope_scaling_recovered_from_rope_freqs():
    from pagedjax.loading.gguf_config import _llama3_factors, _llama3_scaling_from_factors
    from pagedjax.models.config import RopeScaling

    scaling = RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192)
    # llama.cpp writes the factors as float32.
    factors = _llama3_factors(scaling, 500000.0, 64).astype(np.float32).astype(np.float64)
    assert _llama3_scaling_from_factors(factors, 500000.0, 64, None) == scaling
    assert _llama3_scaling_from_factors(np.ones(32), 500000.0, 64, None).rope_type == "default"
    with pytest.raises(ValueError, match="match no known Llama 3 scaling"):
        _llama3_scaling_from_factors(np.linspace(1, 3, 32), 500000.0, 64, None)
