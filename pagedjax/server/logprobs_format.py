"""Engine logprobs ({token_id: Logprob} per token, sampled token first) in OpenAI's shapes."""

from __future__ import annotations

import math
from typing import Optional

# A logprob JSON can hold: processed logprobs are -inf for tokens the sampler masked out
# (top-k, top-p, min-p, banned), which JSON has no number for (vLLM's clamp).
MIN_JSON_LOGPROB = -9999.0


def completion_logprobs(entries: Optional[list], token_ids: list[int], tokenizer,
                        text_offset: int = 0) -> Optional[dict]:
    """/v1/completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    if entries is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(token_id, entry, tokenizer)
        tokens.append(text)
        token_logprobs.append(json_logprob(entry[token_id].logprob))
        top_logprobs.append({_token_text(t, entry, tokenizer): json_logprob(lp.logprob)
                             for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(entries: Optional[list], token_ids: list[int], tokenizer,
                  top_logprobs: int) -> Optional[dict]:
    """/v1/chat/completions `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    content = []
    for token_id, entry in zip(token_ids, entries):
        ranked = sorted(entry.items(), key=lambda item: item[1].rank)[:top_logprobs]
        content.append({
            **_chat_token(token_id, entry[token_id].logprob, entry, tokenizer),
            "top_logprobs": [_chat_token(t, lp.logprob, entry, tokenizer) for t, lp in ranked],
        })
    return {"content": content}


def _chat_token(token_id: int, logprob: float, entry: dict, tokenizer) -> dict:
    text = _token_text(token_id, entry, tokenizer)
    return {"token": text, "logprob": json_logprob(logprob),
            "bytes": list(text.encode("utf-8"))}


def json_logprob(logprob: float) -> float:
    """`logprob` as a JSON number: -inf (a masked token's) becomes MIN_JSON_LOGPROB."""
    return logprob if math.isfinite(logprob) else MIN_JSON_LOGPROB


def _token_text(token_id: int, entry: dict, tokenizer) -> str:
    decoded = entry[token_id].decoded_token
    return decoded if decoded is not None else tokenizer.decode([token_id],
                                                                skip_special_tokens=False)
