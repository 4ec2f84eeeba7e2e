"""HF transformers reference computations shared by the parity tests."""

import torch


def hf_greedy(hf, token_ids, num_tokens):
    """HF's greedy continuation that, like ignore_eos, goes on past EOS."""
    with torch.no_grad():
        out = hf(torch.tensor([token_ids]), use_cache=True)
        generated = []
        for _ in range(num_tokens):
            generated.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.tensor([[generated[-1]]]), past_key_values=out.past_key_values,
                     use_cache=True)
    return generated
