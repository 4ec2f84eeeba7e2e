"""Incremental detokenization: the text each new token adds, never a broken character.

The "prefix offset / read offset" algorithm of HF text-generation-inference and vLLM: the
ids from `prefix_offset` to `read_offset` are already emitted context; each step decodes
that window with and without the new ids and emits the difference. While the decoded tail
ends in U+FFFD (the bytes of a multi-byte character are split across tokens, as byte
fallback / byte-level BPE do) nothing is emitted and the window grows until the character
is complete. Decoding a window that starts a few tokens back, rather than the new token
alone, keeps context-dependent decoding right (SentencePiece's leading-space handling).
"""

from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens kept as decoding context for the first generated tokens (vLLM's value).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated ids into text deltas.

    `add(token_id)` returns the text the token completes ("" while a character is still
    incomplete); `flush()` returns whatever is held back (call it once generation ends).
    The concatenation of all deltas plus the flush equals decoding the generated ids at
    once, for byte-level BPE and byte-fallback tokenizers alike. Special tokens are
    dropped when `skip_special_tokens`; when kept, `spaces_between_special_tokens` puts a
    space between each special token and the text next to it (see `Tokenizer.decode`; as
    in vLLM's slow detokenizer, the first generated token's text may then start with a
    space, separating it from the prompt).
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT:]]
        # Prompt context must end on a whole character, or its dangling bytes would merge
        # with the first generated ones and the output would not decode on its own.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # The same algorithm inside the tokenizers library when the tokenizer offers it
        # (host work per token is what bounds a fast device); the offsets above are kept
        # in step with it so the Python version can take over at any token.
        make_stream = getattr(tokenizer, "decode_stream", None)
        self._stream_step = (make_stream(context, skip_special_tokens)
                             if make_stream is not None and (
                                 skip_special_tokens or not spaces_between_special_tokens)
                             else None)

    def _decode(self, ids: Sequence[int]) -> str:
        if self.spaces_between_special_tokens and not self.skip_special_tokens:
            return self.tokenizer.decode(ids, skip_special_tokens=False,
                                         spaces_between_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> tuple[str, str]:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        return prefix_text, new_text

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the new text (possibly "")."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if self._stream_step is not None:
            try:
                text = self._stream_step(token_id)
            except Exception:  # the library refuses text that doesn't extend the
                self._stream_step = None  # emitted prefix; the Python version goes on
            else:
                if text:
                    self._prefix_offset = self._read_offset
                    self._read_offset = len(self._ids)
                return text or ""
        prefix_text, new_text = self._pending()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing visible yet, or a character still waits for its bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Text held back so far (e.g. bytes that never formed a valid character)."""
        prefix_text, new_text = self._pending()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]
