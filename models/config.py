"""Model configuration: the architecture-level numbers every model file reads.

A `ModelConfig` is frozen and hashable so it can key compiled programs. It is built from
an HF `config.json` dict (`from_hf_dict`) or by a loader (GGUF metadata).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ROPE_TYPES = ("default", "linear", "llama3")
HIDDEN_ACTS = ("silu", "gelu_tanh", "gelu", "relu")
NORM_TYPES = ("rms", "rms_plus_one", "layer")
POSITION_EMBEDDINGS = ("rope", "learned")

# HF activation names -> ours.
_HF_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as HF writes it (`rope_scaling` / `rope_parameters`)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer.

    The params pytree a model of this config reads is documented in `models/params.py`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (and on o unless attention_out_bias says)
    # Family features, all off by default (= Llama). See models/params.py for the leaves
    # each one adds.
    attention_out_bias: Optional[bool] = None  # o_proj bias; None: same as attention_bias
    hidden_act: str = "silu"  # one of HIDDEN_ACTS
    norm_type: str = "rms"  # "rms", "rms_plus_one" (Gemma: x * (1 + w)), "layer" (+ bias)
    qk_norm: bool = False  # Qwen3: RMSNorm over each q / k head before RoPE
    sliding_window: Optional[int] = None  # attend to keys at positions > pos - window
    # Which layers use `sliding_window` (Gemma 2 alternates); None: every layer.
    sliding_window_layers: Optional[tuple[bool, ...]] = None
    attn_logit_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: Optional[float] = None  # attention scale; None: head_dim ** -0.5
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size), in the model dtype
    sandwich_norms: bool = False  # Gemma 2: norms after attention and MLP too
    gated_mlp: bool = True  # down(act(gate) * up); False: down(act(up)) (GPT-2, OPT)
    mlp_bias: bool = False
    position_embedding: str = "rope"  # "rope" or "learned" (absolute table "pos_embed")
    position_offset: int = 0  # learned positions: row of position p is p + offset (OPT: 2)
    pre_norm: bool = True  # False: OPT-350m's post-norm blocks (and no final norm)
    final_norm: bool = True
    embed_dim: Optional[int] = None  # OPT word_embed_proj_dim != hidden: project_in/out
    # Set by the engine only (pagedjax/param_layout.py): the rows of the fused matrices
    # (wqkv, w_gate_up and their biases) come in this many shard-major blocks, one per
    # tensor-parallel device ([q_s, k_s, v_s], [gate_s, up_s]); 1 is the natural layout.
    fused_shards: int = 1
    # Set by the engine only (CPU, one device, float32): float32 products of 2 to this many
    # rows run in the small-matmul kernel (kernels/small_matmul.py); 0 never.
    small_matmul_rows: int = 0
    # Numerics that do not depend on the program (set by the engine's "exact" attention
    # backend and by pagedjax.forward(exact=True)): attention, norms, RoPE and activations
    # in float64, rounded once (kernels/exact_attention.py, models/exact_numerics.py).
    exact: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 and self.position_embedding == "rope":
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name, allowed in (("hidden_act", HIDDEN_ACTS), ("norm_type", NORM_TYPES),
                              ("position_embedding", POSITION_EMBEDDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is not supported; "
                                 f"supported: {', '.join(allowed)}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"ModelConfig.sliding_window must be a positive int or None, "
                             f"got {self.sliding_window!r}")
        if self.attention_out_bias is not None and self.attention_out_bias == self.attention_bias:
            object.__setattr__(self, "attention_out_bias", None)  # one spelling per config
        if self.sliding_window_layers is not None:
            if isinstance(self.sliding_window_layers, list):  # e.g. read back from JSON
                object.__setattr__(self, "sliding_window_layers",
                                   tuple(bool(f) for f in self.sliding_window_layers))
            if not isinstance(self.sliding_window_layers, tuple) or len(
                    self.sliding_window_layers) != self.num_layers:
                raise ValueError("ModelConfig.sliding_window_layers must be a tuple of "
                                 f"num_layers ({self.num_layers}) bools")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0 or None, got {value!r}")
        if self.position_offset < 0:
            raise ValueError(f"ModelConfig.position_offset must be >= 0, got "
                             f"{self.position_offset}")
        if self.embed_dim is not None and (not isinstance(self.embed_dim, int)
                                           or self.embed_dim <= 0):
            raise ValueError(f"ModelConfig.embed_dim must be a positive int or None, "
                             f"got {self.embed_dim!r}")
        if not isinstance(self.fused_shards, int) or self.fused_shards <= 0 or any(
                value % self.fused_shards for value in (
                    self.num_heads, self.num_kv_heads, self.intermediate_size)):
            raise ValueError(f"ModelConfig.fused_shards must be a positive int dividing "
                             f"num_heads, num_kv_heads and intermediate_size, got "
                             f"{self.fused_shards!r}")
        rows = self.small_matmul_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"ModelConfig.small_matmul_rows must be an int >= 0, got "
                             f"{self.small_matmul_rows!r}")
        if not isinstance(self.exact, bool):
            raise ValueError(f"ModelConfig.exact must be a bool, got {self.exact!r}")

    @property
    def o_bias(self) -> bool:
        """Whether the attention output projection has a bias."""
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias

    @property
    def word_dim(self) -> int:
        """Width of the token embedding (hidden_size unless OPT-style projections)."""
        return self.embed_dim or self.hidden_size

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_uses_window(self, layer: int) -> bool:
        """Whether `layer` attends through `sliding_window`."""
        if self.sliding_window is None:
            return False
        return True if self.sliding_window_layers is None else bool(
            self.sliding_window_layers[layer])

    @property
    def queries_per_kv(self) -> int:
        """Query heads sharing one KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from an HF `config.json` dict (transformers 4.x and 5.x RoPE forms).

        The family is picked by `architectures[0]`; each family reads its own keys
        (GPT-2's n_embd, OPT's ffn_dim, Gemma 2's soft-caps, ...). Unknown architectures
        are read like Llama, and rejected later by the registry/loader."""
        architectures = hf.get("architectures") or []
        if not architectures:
            raise ValueError("config.json has no 'architectures' field: cannot pick a model")
        arch = architectures[0]
        if arch == "GPT2LMHeadModel":
            return _gpt2_config(cls, hf, arch)
        if arch == "OPTForCausalLM":
            return _opt_config(cls, hf, arch)
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        num_layers = hf["num_hidden_layers"]
        gemma = arch in ("GemmaForCausalLM", "Gemma2ForCausalLM")
        extra: dict[str, Any] = {}
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if gemma and not hf.get("hidden_activation") and act == "gelu":
            # Gemma's reference (and transformers since 4.38) uses the tanh GELU even
            # where early config.json files say "gelu".
            act = "gelu_pytorch_tanh"
        extra["hidden_act"] = _hf_act(act)
        extra["mlp_bias"] = bool(hf.get("mlp_bias", False))
        rope = hf.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            extra["attention_out_bias"] = False
            if arch == "Qwen2ForCausalLM":
                extra["attention_bias"] = True  # Qwen2 always has q/k/v biases
            extra["qk_norm"] = arch == "Qwen3ForCausalLM"
        window = hf.get("sliding_window")
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not hf.get("use_sliding_window"):
            window = None
        if window is not None:
            extra["sliding_window"] = int(window)
            layer_types = hf.get("layer_types")
            if layer_types is not None:
                flags = tuple(t == "sliding_attention" for t in layer_types)
                if not any(flags):
                    extra.pop("sliding_window")
                elif not all(flags):
                    extra["sliding_window_layers"] = flags
            elif arch == "Gemma2ForCausalLM":
                extra["sliding_window_layers"] = tuple(i % 2 == 0 for i in range(num_layers))
            elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and hf.get("max_window_layers"):
                # transformers 4.x: the window applies from layer max_window_layers up.
                first = int(hf["max_window_layers"])
                if first >= num_layers:
                    extra.pop("sliding_window")
                elif first > 0:
                    extra["sliding_window_layers"] = tuple(i >= first for i in range(num_layers))
        if gemma:
            extra.update(norm_type="rms_plus_one", embed_scale=True)
        if arch == "Gemma2ForCausalLM":
            extra.update(
                sandwich_norms=True,
                attn_logit_softcap=_opt_float(hf.get("attn_logit_softcapping")),
                final_logit_softcap=_opt_float(hf.get("final_logit_softcapping")),
                query_pre_attn_scalar=_opt_float(hf.get("query_pre_attn_scalar")))
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(hf)),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            **{"attention_bias": bool(hf.get("attention_bias", False)), **extra},
        )


def _opt_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


def _hf_act(name: str) -> str:
    if name not in _HF_ACTS:
        raise ValueError(f"config.json activation {name!r} is not supported; supported: "
                         f"{', '.join(sorted(_HF_ACTS))}")
    return _HF_ACTS[name]


def _gpt2_config(cls, hf: Mapping[str, Any], arch: str) -> "ModelConfig":
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise ValueError(f"GPT-2 config {key}=true is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("GPT-2 config scale_attn_weights=false is not supported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return cls(
        architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden, num_layers=hf["n_layer"],
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=hf.get("n_positions", 1024),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=True, hidden_act=_hf_act(hf.get("activation_function", "gelu_new")),
        norm_type="layer", gated_mlp=False, mlp_bias=True, position_embedding="learned")


def _opt_config(cls, hf: Mapping[str, Any], arch: str) -> "ModelConfig":
    if hf.get("layer_norm_elementwise_affine", True) is False:
        raise ValueError("OPT config layer_norm_elementwise_affine=false is not supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf.get("enable_bias", True))
    pre_norm = bool(hf.get("do_layer_norm_before", True))
    word_dim = hf.get("word_embed_proj_dim") or hidden
    return cls(
        architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hidden,
        intermediate_size=hf["ffn_dim"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        rms_norm_eps=1e-5, max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bias, hidden_act=_hf_act(hf.get("activation_function", "relu")),
        norm_type="layer", gated_mlp=False, mlp_bias=bias, position_embedding="learned",
        position_offset=2, pre_norm=pre_norm,
        final_norm=pre_norm and not hf.get("_remove_final_layer_norm", False),
        embed_dim=None if word_dim == hidden else word_dim)


def _rope_theta(hf: Mapping[str, Any]) -> float:
    # transformers 5.x nests RoPE settings under rope_parameters; 4.x keeps them top level.
    params = hf.get("rope_parameters") or {}
    return params.get("rope_theta", hf.get("rope_theta", 10000.0))


def _rope_scaling(hf: Mapping[str, Any]) -> RopeScaling:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling.get("original_max_position_embeddings", 8192)),
    )
