"""The engine with the Pallas attention kernel (interpret mode on CPU) against the reference."""

from pagedjax import SamplingParams
from pagedjax.kernels import pallas_attention
from tests.helpers.engines import make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# A chunked prefill (budget 16 tokens) that reads its own cached context, a short prompt,
# and decodes of both crossing page boundaries (block_size 4).
PROMPTS = ["The quick brown fox jumps over the lazy dog, then runs far away.", "Hi"]


def test_pallas_backend_matches_reference_greedy_tokens(tiny_llama_dir, monkeypatch):
    traced = []
    kernel = pallas_attention.paged_attention
    monkeypatch.setattr(pallas_attention, "paged_attention",
                        lambda *a, **kw: traced.append(a[0].shape) or kernel(*a, **kw))
    results = {}
    for backend in ("reference", "pallas"):
        llm = make_llm(tiny_llama_dir, attention_backend=backend, max_num_batched_tokens=16)
        assert llm.engine.attention_backend == backend
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert len(outputs[0].prompt_token_ids) > 32  # three prefill chunks at least
        results[backend] = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(tokens) == 8 for tokens in results["reference"])
    assert results["pallas"] == results["reference"]
    assert traced  # the engine really ran the Pallas kernel


def test_pallas_backend_with_multi_step_decode(tiny_llama_dir):
    """Block tables holding every page of a multi-step call, read by the kernel."""
    reference = make_llm(tiny_llama_dir, attention_backend="reference")
    pallas = make_llm(tiny_llama_dir, attention_backend="pallas", num_scheduler_steps=4)
    want = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, GREEDY, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in pallas.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    assert any(key.num_steps == 4 for key in pallas.engine.runner.compiled_keys)
