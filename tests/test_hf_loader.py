"""HF safetensors loading, the HF-dir tokenizer, and model resolution, on tiny random models."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from pagedjax.loading import (Tokenizer, default_gguf_path, load_hf_checkpoint, load_model,
                              resolve_model)
from pagedjax.loading.model_source import DEFAULT_GGUF_FILE
from tests.helpers.tiny_models import CHATML_TEMPLATE, make_tiny_llama

VARIANTS = {
    # name: make_tiny_llama kwargs
    "untied_f32": dict(num_kv_heads=2, tie=False, dtype="float32", shard=False),
    "tied_bf16_sharded": dict(num_kv_heads=1, tie=True, dtype="bfloat16", shard=True),
    "mha_f16_bias": dict(num_kv_heads=4, tie=False, dtype="float16", shard=False,
                         attention_bias=True),
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {name: make_tiny_llama(tmp_path_factory.mktemp(name), seed=i, **kwargs)
            for i, (name, kwargs) in enumerate(VARIANTS.items())}


def _hf_state(model_dir):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype="auto")
    return {k: v.to(torch.float32).numpy() for k, v in model.state_dict().items()}


def _expected_params(state, n_layers, bias, tied):
    """The HF state dict re-arranged into the params layout (fused, stacked)."""
    def stack(fn):
        return np.stack([fn(f"model.layers.{i}.") for i in range(n_layers)])

    layers = {
        "attn_norm": stack(lambda p: state[p + "input_layernorm.weight"]),
        "wqkv": stack(lambda p: np.concatenate(
            [state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])),
        "wo": stack(lambda p: state[p + "self_attn.o_proj.weight"]),
        "mlp_norm": stack(lambda p: state[p + "post_attention_layernorm.weight"]),
        "w_gate_up": stack(lambda p: np.concatenate(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])),
        "w_down": stack(lambda p: state[p + "mlp.down_proj.weight"]),
    }
    if bias:
        layers["bqkv"] = stack(lambda p: np.concatenate(
            [state[p + f"self_attn.{x}_proj.bias"] for x in "qkv"]))
        layers["bo"] = stack(lambda p: state[p + "self_attn.o_proj.bias"])
    params = {"embed": state["model.embed_tokens.weight"], "layers": layers,
              "final_norm": state["model.norm.weight"]}
    if not tied:
        params["lm_head"] = state["lm_head.weight"]
    return params


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_params_equal_hf_state_dict(tiny_dirs, variant):
    model_dir = tiny_dirs[variant]
    config, params, tokenizer = load_hf_checkpoint(model_dir)
    kwargs = VARIANTS[variant]
    assert config.num_kv_heads == kwargs["num_kv_heads"]
    assert config.tie_word_embeddings == kwargs["tie"]
    assert config.attention_bias == kwargs.get("attention_bias", False)
    expected = _expected_params(_hf_state(model_dir), config.num_layers,
                                config.attention_bias, config.tie_word_embeddings)
    assert set(params) == set(expected) and set(params["layers"]) == set(expected["layers"])
    # bf16 and f16 widen to f32 exactly, so every variant compares bit for bit.
    for key in ("embed", "final_norm", "lm_head"):
        if key in expected:
            assert params[key].dtype == np.float32
            np.testing.assert_array_equal(params[key], expected[key], err_msg=key)
    for key, value in expected["layers"].items():
        assert params["layers"][key].dtype == np.float32
        np.testing.assert_array_equal(params["layers"][key], value, err_msg=key)
    assert tokenizer.vocab_size == config.vocab_size


def test_requested_dtype(tiny_dirs):
    _, f32, _ = load_hf_checkpoint(tiny_dirs["tied_bf16_sharded"])
    _, bf16, _ = load_hf_checkpoint(tiny_dirs["tied_bf16_sharded"], dtype="bfloat16")
    assert bf16["layers"]["wqkv"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf16["layers"]["wqkv"].astype(np.float32), f32["layers"]["wqkv"])
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_hf_checkpoint(tiny_dirs["untied_f32"], dtype="int8")


# -- errors ------------------------------------------------------------------------------


@pytest.fixture
def untied_copy(tiny_dirs, tmp_path):
    return shutil.copytree(tiny_dirs["untied_f32"], tmp_path / "model")


def _rewrite_weights(model_dir, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


def test_missing_tensor_is_named(untied_copy):
    _rewrite_weights(untied_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(untied_copy)


def test_untied_without_lm_head_is_named(untied_copy):
    _rewrite_weights(untied_copy, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        load_hf_checkpoint(untied_copy)


def test_wrong_shape_is_named(untied_copy):
    def edit(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = np.zeros((7, 64), np.float32)

    _rewrite_weights(untied_copy, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(7, 64\), expected \(32, 64\)"):
        load_hf_checkpoint(untied_copy)


def test_unexpected_tensor_is_named(untied_copy):
    _rewrite_weights(untied_copy, lambda t: t.update(
        {"model.layers.0.mlp.gate_proj.bias": np.zeros(128, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.bias"):
        load_hf_checkpoint(untied_copy)


def test_missing_config(untied_copy):
    os.remove(os.path.join(untied_copy, "config.json"))
    with pytest.raises(ValueError, match="has no config.json"):
        load_hf_checkpoint(untied_copy)


def test_config_missing_field(untied_copy):
    _edit_config(untied_copy, hidden_size=None)
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        load_hf_checkpoint(untied_copy)


def test_missing_weights(untied_copy):
    os.remove(os.path.join(untied_copy, "model.safetensors"))
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf_checkpoint(untied_copy)


def test_unknown_architecture(untied_copy):
    _edit_config(untied_copy, architectures=["MambaForCausalLM"])
    with pytest.raises(ValueError, match="MambaForCausalLM is not supported; supported: LlamaForCausalLM"):
        load_hf_checkpoint(untied_copy)
    config, _, _ = load_hf_checkpoint(
        untied_copy, supported_architectures=("LlamaForCausalLM", "MambaForCausalLM"))
    assert config.architecture == "MambaForCausalLM"


def test_missing_shard(tiny_dirs, tmp_path):
    model_dir = shutil.copytree(tiny_dirs["tied_bf16_sharded"], tmp_path / "model")
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2
    os.remove(os.path.join(model_dir, shards[1]))
    with pytest.raises(ValueError, match=shards[1].replace(".", r"\.")):
        load_hf_checkpoint(model_dir)


# -- tokenizer from an HF dir ------------------------------------------------------------

TEXTS = ["the cat and the hat", "  spaces  and\ttabs\n", "héllo 🤗 123",
         "<|im_start|>user\nhi<|im_end|>", ""]


def test_tokenizer_matches_transformers(tiny_dirs):
    from transformers import AutoTokenizer

    model_dir = tiny_dirs["untied_f32"]
    ours, theirs = Tokenizer.from_hf_dir(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert ours.chat_template == CHATML_TEMPLATE


@pytest.fixture
def tok_dir(tiny_dirs, tmp_path):
    model_dir = tmp_path / "tok"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tiny_dirs["untied_f32"], name), model_dir / name)
    return model_dir


def _edit_json(path, **changes):
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def test_eos_ids_from_generation_config(tok_dir):
    _edit_json(tok_dir / "generation_config.json", eos_token_id=[2, 0])
    tok = Tokenizer.from_hf_dir(tok_dir)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({0, 2})
    _edit_json(tok_dir / "generation_config.json", eos_token_id=1)
    assert Tokenizer.from_hf_dir(tok_dir).eos_token_ids == frozenset({1, 2})


def test_add_bos_token(tok_dir):
    _edit_json(tok_dir / "tokenizer_config.json", add_bos_token=True)
    tok = Tokenizer.from_hf_dir(tok_dir)
    hello = Tokenizer.from_hf_dir(tok_dir).encode("hello", add_special_tokens=False)
    assert tok.encode("hello") == [1] + hello
    assert tok.encode("<|im_start|>hello") == [1, 1] + hello  # like transformers
    assert tok.encode("hello", add_special_tokens=False) == hello


def test_chat_template_sources_and_errors(tok_dir):
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}")
    tok = Tokenizer.from_hf_dir(tok_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x<|im_end|>"
    custom = "{{ bos_token }}{% if tools is not none %}T{% endif %}{{ messages[0]['content'] }}"
    assert tok.apply_chat_template([{"role": "user", "content": "y"}], chat_template=custom) == "<|im_start|>y"
    failing = "{{ raise_exception('only user messages') }}"
    with pytest.raises(ValueError, match="only user messages"):
        tok.apply_chat_template([{"role": "user", "content": "z"}], chat_template=failing)
    os.remove(tok_dir / "chat_template.jinja")
    _edit_json(tok_dir / "tokenizer_config.json", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_hf_dir(tok_dir).apply_chat_template([{"role": "user", "content": "x"}])


def test_named_chat_templates(tok_dir):
    _edit_json(tok_dir / "tokenizer_config.json", chat_template=[
        {"name": "default", "template": "D{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}])
    tok = Tokenizer.from_hf_dir(tok_dir)
    chat = [{"role": "user", "content": "q"}]
    assert tok.apply_chat_template(chat) == "Dq"
    assert tok.apply_chat_template(chat, chat_template="tool_use") == "Tq"


def test_sentencepiece_only_dir(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    os.remove(tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# -- resolve_model -----------------------------------------------------------------------


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No network, an empty HF cache: nothing a test does can touch the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf_home" / "hub"


def test_resolve_default_file_and_dir(tiny_dirs, tmp_path, offline_empty_cache):
    kind, path = resolve_model(None)
    assert kind == "gguf" and path == default_gguf_path()
    assert path.endswith(DEFAULT_GGUF_FILE) and os.path.isfile(path)
    assert resolve_model(path) == ("gguf", path)
    model_dir = tiny_dirs["untied_f32"]
    assert resolve_model(model_dir) == ("hf", model_dir)
    gguf_dir = tmp_path / "gguf_dir"
    gguf_dir.mkdir()
    (gguf_dir / "m.gguf").write_bytes(b"")
    assert resolve_model(str(gguf_dir)) == ("gguf", str(gguf_dir / "m.gguf"))
    (gguf_dir / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(gguf_dir))


def test_resolve_not_found(tmp_path, offline_empty_cache):
    with pytest.raises(ValueError, match="model 'nobody/no-such-model' not found: not a local path and not in the HF cache"):
        resolve_model("nobody/no-such-model")
    with pytest.raises(ValueError, match="not found"):
        resolve_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="has no config.json and no .gguf"):
        resolve_model(str(tmp_path))


def test_resolve_from_hf_cache(tiny_dirs, offline_empty_cache):
    repo = offline_empty_cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_dirs["untied_f32"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_model("tiny-org/tiny-llama") == ("hf", str(snapshot))
    config, params, tokenizer = load_model("tiny-org/tiny-llama")
    assert config.num_layers == 2 and tokenizer.eos_token_id == 2


def test_resolve_revision_from_hf_cache(tiny_dirs, offline_empty_cache):
    """Two snapshots: main -> abc123 (untied), tag v2 -> def456 (tied, bf16); a revision is a
    ref (branch/tag) or a commit folder, and an unknown one is an error naming it."""
    from pagedjax import LLM

    repo = offline_empty_cache / "models--tiny-org--tiny-llama"
    main = repo / "snapshots" / "abc123"
    tagged = repo / "snapshots" / "def456"
    shutil.copytree(tiny_dirs["untied_f32"], main)
    shutil.copytree(tiny_dirs["tied_bf16_sharded"], tagged)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "refs" / "v2").write_text("def456\n")
    name = "tiny-org/tiny-llama"
    assert resolve_model(name) == ("hf", str(main))
    assert resolve_model(name, revision="main") == ("hf", str(main))
    assert resolve_model(name, revision="v2") == ("hf", str(tagged))
    assert resolve_model(name, revision="def456") == ("hf", str(tagged))  # a commit
    assert resolve_model(name, revision="abc123") == ("hf", str(main))
    assert load_model(name, revision="v2")[0].tie_word_embeddings
    assert not load_model(name)[0].tie_word_embeddings
    for bad in ("v3", "0123abc"):
        with pytest.raises(ValueError, match=f"model 'tiny-org/tiny-llama' revision '{bad}' "
                                             "not found"):
            resolve_model(name, revision=bad)
    with pytest.raises(ValueError, match="revision 'nope' not found"):
        LLM(name, revision="nope")
    with pytest.raises(ValueError, match="not a valid"):
        resolve_model(name, revision="../../etc")
    with pytest.raises(ValueError, match="only for hub ids"):
        resolve_model(tiny_dirs["untied_f32"], revision="main")


def test_load_model_dispatch_and_architecture_check(tiny_dirs, tmp_path, offline_empty_cache):
    from tests.helpers.tiny_gguf import make_tiny_llama_gguf

    path = make_tiny_llama_gguf(tiny_dirs["untied_f32"], tmp_path / "tiny.gguf")
    g_config, _, _ = load_model(path)
    h_config, _, _ = load_model(tiny_dirs["untied_f32"], dtype="float32")
    assert g_config == h_config
    for model in (path, tiny_dirs["untied_f32"]):
        with pytest.raises(ValueError, match="not supported; supported: MambaForCausalLM"):
            load_model(model, supported_architectures=("MambaForCausalLM",))


def test_raw_safetensors_reader_matches_library(tiny_dirs):
    # The fallback used when safetensors' numpy API cannot build a dtype (bf16 on some
    # versions) reads the same values as the library.
    from safetensors import safe_open

    from pagedjax.loading.safetensors_files import _read_raw, checkpoint_files

    files = checkpoint_files(tiny_dirs["tied_bf16_sharded"])
    path, names = next(iter(files.items()))
    with safe_open(path, framework="np") as f:
        for name in names:
            expected = f.get_tensor(name)
            actual = _read_raw(path, name)
            assert actual.dtype == expected.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(actual, expected)
