"""The model zoo: every registered architecture besides Llama (tests/test_model_parity.py)
against HF transformers on tiny random checkpoints saved with save_pretrained.

For each variant: fp32 logits equal HF's at prefill (chunked, two sequences in one step)
and decode (two sequences per step), and greedy token ids equal HF's over 32 tokens for
several prompts through `LLM` with several sequences per step. Sliding windows are 8
tokens, shorter than the prompts, so they change the result. Half-precision checkpoints
(bf16, fp16) of one family load and agree with HF.
"""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from pagedjax.models import SUPPORTED_ARCHITECTURES, build_model
from pagedjax.models.config import ModelConfig
from transformers import AutoModelForCausalLM

from pagedjax import LLM
from pagedjax.sampling_params import SamplingParams
from tests.helpers.hf_reference import (
    check_greedy_matches_hf,
    check_paged_logits,
    hf_greedy,
    hf_logits,
)
from tests.helpers.tiny_zoo import VARIANTS, make_tiny_model

ATOL = 2e-4  # fp32; logits are O(1-10)
ENGINE = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_blocks=40,
              block_size=8)


def _make(tmp_path_factory, name, **kwargs):
    arch, overrides = VARIANTS[name]
    model_dir = make_tiny_model(tmp_path_factory.mktemp(name), arch, **overrides, **kwargs)
    return model_dir


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    model_dir = _make(tmp_path_factory, request.param)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model_dir, **ENGINE)
    assert llm.engine.model_config.architecture == VARIANTS[request.param][0]
    return SimpleNamespace(name=request.param, hf=hf, llm=llm, dir=model_dir)


def test_logits_match_hf_at_prefill_and_decode(tiny):
    check_paged_logits(tiny.llm.engine, tiny.hf, atol=ATOL)


def test_greedy_ids_match_hf_over_32_tokens(tiny):
    check_greedy_matches_hf(tiny.llm, tiny.hf, lengths=(3, 11, 20, 6))


def test_prefix_cache_hits_give_hf_tokens(tiny):
    """A prompt that extends an earlier one reads its first pages from the prefix cache
    (sliding windows and soft-caps included) and still gives HF's greedy ids."""
    vocab = tiny.llm.engine.model_config.vocab_size
    first = np.random.default_rng(3).integers(3, vocab, size=25).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tiny.llm.generate([{"prompt_token_ids": first}], params, use_tqdm=False)
    longer = first + [4, 5, 6]
    out = tiny.llm.generate([{"prompt_token_ids": longer}], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 24  # three full pages of 8
    assert out.outputs[0].token_ids == hf_greedy(tiny.hf, longer, 8)


def test_prompt_logprobs_match_hf(tiny):
    """The all-token logits path (prompt logprobs) of every model file, soft-cap and
    OPT's project_out included."""
    prompt = np.random.default_rng(2).integers(3, tiny.llm.engine.model_config.vocab_size,
                                               size=20).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = tiny.llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(tiny.hf(torch.tensor([prompt])).logits[0].double(), -1).numpy()
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        token = prompt[pos]
        assert abs(out.prompt_logprobs[pos][token].logprob - ref[pos - 1, token]) < 1e-4


@pytest.mark.parametrize("name", ["mistral_gqa_window", "qwen2_window_upper_layer",
                                  "gemma2_softcap_window"])
def test_sliding_window_matters(tmp_path_factory, name):
    """The 8-token window changes HF's logits for these prompt lengths, so the parity
    tests above do check it."""
    model_dir = _make(tmp_path_factory, name)
    windowed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                sliding_window=10_000).eval()
    tokens = list(range(3, 23))
    assert np.abs(hf_logits(windowed, tokens)[-1] - hf_logits(full, tokens)[-1]).max() > 1e-2


# Half-precision activations vs HF fp32, logits O(1-10): observed max |diff| about 0.05
# (bf16) and under 0.01 (fp16); the tolerances leave about 2x room.
HALF_ATOL = {"bfloat16": 0.1, "float16": 0.02}


@pytest.mark.parametrize("dtype", sorted(HALF_ATOL))
def test_half_precision_checkpoints(tmp_path_factory, dtype):
    """A bf16 / fp16 checkpoint loads (default dtype on CPU: fp32 params holding the
    stored values) and matches HF's fp32 upcast to fp32 tolerance; run in its own dtype
    it matches HF fp32 within HALF_ATOL."""
    model_dir = _make(tmp_path_factory, "qwen2_bias_tied", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(model_dir, **ENGINE)
    check_paged_logits(llm.engine, hf, atol=ATOL)

    half = LLM(model_dir, dtype=dtype, **ENGINE)
    assert half.engine.runner.params["embed"].dtype == np.dtype(dtype)
    # On CPU a bfloat16 pool is written and read by the native kernels; float16 K/V go
    # into a float32 pool (XLA CPU has no 16-bit scatter), which the kernels read too.
    pool = "bfloat16" if dtype == "bfloat16" else "float32"
    assert half.engine.runner.kv_cache.k.dtype == np.dtype(pool)
    assert half.engine.attention_backend == "native"
    check_paged_logits(half.engine, hf, atol=HALF_ATOL[dtype], rtol=0)


def test_registry_lists_every_architecture():
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM",
                 "Gemma2ForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM"):
        assert arch in SUPPORTED_ARCHITECTURES
    config = ModelConfig(architecture="MambaForCausalLM", vocab_size=8, hidden_size=8,
                         intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                         head_dim=8)
    with pytest.raises(ValueError, match="not supported; supported: .*GemmaForCausalLM.*"
                                         "Qwen3ForCausalLM"):
        build_model(config)


def test_config_validation():
    base = dict(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8,
                intermediate_size=8, num_layers=2, num_heads=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig(**base, hidden_act="mish")
    with pytest.raises(ValueError, match="sliding_window must be"):
        ModelConfig(**base, sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window_layers"):
        ModelConfig(**base, sliding_window=4, sliding_window_layers=(True,))
    with pytest.raises(ValueError, match="attn_logit_softcap"):
        ModelConfig(**base, attn_logit_softcap=-1.0)
    config = ModelConfig(**base, sliding_window=4, sliding_window_layers=(True, False))
    assert hash(config) == hash(config.replace())
    assert [config.layer_uses_window(i) for i in range(2)] == [True, False]
    gemma = {"architectures": ["GemmaForCausalLM"], "vocab_size": 8, "hidden_size": 8,
             "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
             "hidden_act": "gelu"}
    qwen = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 1,
            "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}
    # transformers 4.x files have no layer_types: the window starts at max_window_layers.
    assert ModelConfig.from_hf_dict(qwen).sliding_window_layers == (False, True, True)
    assert ModelConfig.from_hf_dict({**qwen, "use_sliding_window": False}).sliding_window is None
    # Early Gemma config.json files say "gelu"; the model uses the tanh approximation.
    assert ModelConfig.from_hf_dict(gemma).hidden_act == "gelu_tanh"
    assert ModelConfig.from_hf_dict(gemma).tie_word_embeddings  # Gemma's default
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_hf_dict({
            "architectures": ["Phi3ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
            "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}})


@pytest.mark.parametrize("name,gguf_arch,changes", [
    ("qwen2_bias_tied", "qwen2", {}),
    ("qwen3_qknorm_mha", "qwen3", {}),
    ("phi3_fused", "phi3", {}),
    ("gemma_mqa_tied", "gemma", {}),
    # GGUF has no query_pre_attn_scalar: llama.cpp uses head_dim below 46 layers.
    ("gemma2_softcap_window", "gemma2", dict(query_pre_attn_scalar=16)),
    ("gpt2_mha_tied", "gpt2", {}),
])
def test_gguf_matches_hf(tmp_path_factory, name, gguf_arch, changes):
    """GGUF files as llama.cpp's converter writes them (qwen2: q/k/v biases, no q/k row
    permutation; qwen3: q/k norms; phi3: fused qkv and gate_up; gemma: norms stored as
    1 + w; gemma2: also sandwich norms, soft-caps and window from metadata; gpt2: fused
    qkv, LayerNorm and linear biases, learned positions) load and match HF to fp32
    tolerance."""
    from tests.helpers.tiny_zoo import make_tiny_gguf

    arch, overrides = VARIANTS[name]
    model_dir = make_tiny_model(tmp_path_factory.mktemp(name), arch,
                                **{**overrides, **changes})
    path = make_tiny_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "m.gguf", gguf_arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(path, **ENGINE)
    assert llm.engine.model_config.architecture == VARIANTS[name][0]
    check_paged_logits(llm.engine, hf, atol=ATOL)


def test_gguf_gemma2_attention_scale_follows_llama_cpp():
    """llama.cpp's Gemma 2 rule: 1 / sqrt(hidden / heads) for the 46-layer 27B model,
    1 / sqrt(head_dim) otherwise (both agree with the released config.json files)."""
    from types import SimpleNamespace as NS

    from pagedjax.loading.gguf_loader import config_from_gguf

    def config(layers, hidden, heads, head_dim, **extra):
        meta = {"general.architecture": "gemma2", "gemma2.block_count": layers,
                "gemma2.embedding_length": hidden, "gemma2.feed_forward_length": 8,
                "gemma2.attention.head_count": heads, "gemma2.attention.head_count_kv": heads // 2,
                "gemma2.attention.key_length": head_dim,
                "gemma2.attention.value_length": head_dim,
                "gemma2.attention.layer_norm_rms_epsilon": 1e-6, **extra}
        tensors = {"token_embd.weight": NS(shape=np.array([hidden, 32]))}
        return config_from_gguf(meta, tensors)

    c27 = config(46, 4608, 32, 128)  # gemma-2-27b: query_pre_attn_scalar 144
    assert c27.query_pre_attn_scalar == 144 and c27.attention_scale == 144 ** -0.5
    c9 = config(42, 3584, 16, 256)  # gemma-2-9b: query_pre_attn_scalar 256
    assert c9.query_pre_attn_scalar == 256
    # llama.cpp's defaults for files without soft-cap / window keys.
    assert (c9.attn_logit_softcap, c9.final_logit_softcap, c9.sliding_window) == (50.0, 30.0,
                                                                                  4096)
    assert c9.sliding_window_layers[:3] == (True, False, True)
    assert c9.architecture == "Gemma2ForCausalLM" and c9.sandwich_norms and c9.tie_word_embeddings
    small = config(3, 64, 4, 16, **{"gemma2.attn_logit_softcapping": 5.0,
                                    "gemma2.attention.sliding_window": 8})
    assert small.query_pre_attn_scalar == 16 and small.attn_logit_softcap == 5.0
    assert small.sliding_window == 8


@pytest.mark.parametrize("name,prefix", [("gpt2_mha_tied", "transformer."),
                                         ("opt_project_in_out", "model.")])
def test_base_model_checkpoint_names(tmp_path_factory, name, prefix):
    """Hub GPT-2 / OPT files were saved from the bare base model: their names lack the
    "transformer." / "model." prefix (and GPT-2's hold attention-mask buffers)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from pagedjax.loading import load_hf_checkpoint

    model_dir = _make(tmp_path_factory, name)
    bare = str(tmp_path_factory.mktemp(name + "_bare"))
    shutil.copytree(model_dir, bare, dirs_exist_ok=True)
    path = bare + "/model.safetensors"
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v
               for k, v in load_file(path).items()}
    if name.startswith("gpt2"):
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), np.float32))
    save_file(tensors, path, metadata={"format": "pt"})
    _, expected, _ = load_hf_checkpoint(model_dir)
    _, got, _ = load_hf_checkpoint(bare)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
