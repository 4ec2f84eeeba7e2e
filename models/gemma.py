"""Gemma and Gemma 2 (`GemmaForCausalLM`, `Gemma2ForCausalLM`).

They are Llama-shaped decoders, so they reuse `llama.py`'s scanned layers; their
differences are ModelConfig flags that `ModelConfig.from_hf_dict` sets for them:

* embeddings scaled by sqrt(hidden_size) in the model dtype (`embed_scale`);
* RMSNorm computing x_normed * (1 + w) in float32 (`norm_type="rms_plus_one"`);
* GeGLU MLP with the tanh GELU (`hidden_act="gelu_tanh"`); explicit head_dim; tied head;
* Gemma 2 only: norms after attention and after the MLP too (`sandwich_norms`), attention
  logit soft-cap, final logit soft-cap, attention scale query_pre_attn_scalar ** -0.5, and
  a sliding window on even layers only (`sliding_window_layers`, scanned per layer).
"""

from __future__ import annotations

from .llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 1 and 2 (the config says which features are on)."""
