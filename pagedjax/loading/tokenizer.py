"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special ids and chat template.

Built from an HF model directory (`Tokenizer.from_hf_dir`, in hf_tokenizer.py) or from
GGUF metadata (`gguf_tokenizer.tokenizer_from_gguf`). No transformers at run time:
tokenizer.json is read by the `tokenizers` library and chat templates are rendered with
jinja2.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Sequence

import jinja2
import tokenizers
import tokenizers.decoders

from .chat_template import (compile_chat_template, render_chat_template,
                            render_continuing_final_message)


class Tokenizer:
    """Encode/decode text and render chat prompts for one model.

    `eos_token_ids` holds every id that ends generation (a model's generation_config may
    list several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>); `eos_token_id` is the
    primary one.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: Optional[int] = None,
        eos_token_id: Optional[int] = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: Optional[int] = None,
        unk_token_id: Optional[int] = None,
        add_bos_token: bool = False,
        chat_template: Optional[str] = None,
        named_chat_templates: Optional[dict[str, str]] = None,
    ):
        self._backend = backend
        self.bos_token_id = bos_token_id
        eos_ids = set(int(i) for i in eos_token_ids)
        if eos_token_id is None and eos_ids:
            eos_token_id = min(eos_ids)
        if eos_token_id is not None:
            eos_ids.add(int(eos_token_id))
        self.eos_token_id = eos_token_id
        self.eos_token_ids = frozenset(eos_ids)
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.named_chat_templates = dict(named_chat_templates or {})
        # Compiled templates by source text: compiling a big template costs milliseconds,
        # and a server renders one per chat request.
        self._compiled: dict[str, jinja2.Template] = {}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json,
        special_tokens_map.json, config.json, chat_template.jinja) from an HF model dir."""
        from .hf_tokenizer import tokenizer_from_hf_dir  # it imports this module

        return tokenizer_from_hf_dir(model_dir, cls)

    # -- properties -----------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for incremental detokenization)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included.

        A model's embedding may have more rows than this (padded vocabularies)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> Optional[str]:
        """The BOS token's text, or None."""
        return self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> Optional[str]:
        """The primary EOS token's text, or None."""
        return self.id_to_token(self.eos_token_id)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (skipped by `decode(skip_special_tokens=True)`)."""
        return frozenset(i for i, tok in self._backend.get_added_tokens_decoder().items()
                         if tok.special)

    # -- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS is added only if the model's
        tokenizer adds one (its post-processor or `add_bos_token`).

        As in transformers, BOS is added even when the text already starts with one: text
        rendered by a chat template usually does, so encode it with
        `add_special_tokens=False`.
        """
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode_stream(self, context_ids: Sequence[int], skip_special_tokens: bool = True
                      ) -> Optional[Callable[[int], Optional[str]]]:
        """A step function for incremental decoding done inside the tokenizers library:
        each call feeds one id and returns the text it completes, or None while a
        character waits for more bytes. It runs IncrementalDetokenizer's prefix / read
        offset algorithm with `context_ids` as already-emitted context, at a fraction of the
        Python version's cost per token. None when this tokenizers version lacks it."""
        try:
            stream = tokenizers.decoders.DecodeStream(
                ids=[int(i) for i in context_ids], skip_special_tokens=skip_special_tokens)
        except (AttributeError, TypeError):  # tokenizers < 0.21: no DecodeStream(ids=...)
            return None
        backend = self._backend
        return lambda token_id: stream.step(backend, token_id)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = False) -> str:
        """Text of token `ids`.

        With `spaces_between_special_tokens` (and special tokens kept), the text is built
        the way HF's slow tokenizers (and vLLM's slow detokenizer) do: the runs of ordinary
        tokens and each special token are decoded separately and joined with one space
        ("a<|im_end|>b" -> "a <|im_end|> b"). Without it, the tokenizer's own decoder
        joins everything (for byte-level BPE: no spaces are added).
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens or not spaces_between_special_tokens:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        special = self.special_token_ids
        parts: list[str] = []
        run: list[int] = []
        for token in ids:
            if token in special:
                if run:
                    parts.append(self._backend.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self._backend.id_to_token(token))
            else:
                run.append(token)
        if run:
            parts.append(self._backend.decode(run, skip_special_tokens=False))
        return " ".join(parts)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: Optional[int]) -> Optional[str]:
        """Token string of an id (as stored in the vocabulary), or None."""
        return None if token_id is None else self._backend.id_to_token(int(token_id))

    # -- chat -----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: Optional[str] = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` (dicts with "role" and "content") into a prompt string.

        `chat_template` overrides the model's template; it may be template text or the
        name of one of the model's named templates. Extra keyword arguments (e.g. `tools`)
        become template variables. `continue_final_message` (transformers' semantics)
        leaves the last message open: the text is cut right after its content, so
        generation continues it; it excludes `add_generation_prompt`.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not "
                             "compatible: pass add_generation_prompt=False to continue the "
                             "final message")
        source = chat_template
        if source is not None and source in self.named_chat_templates:
            source = self.named_chat_templates[source]
        if source is None:
            source = self.chat_template
        if source is None:
            raise ValueError(
                "this model has no chat template; pass chat_template=... or use plain prompts"
            )
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = self._compiled[source] = compile_chat_template(source)
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.id_to_token(self.pad_token_id),
            "unk_token": self.id_to_token(self.unk_token_id),
        }
        if not continue_final_message:
            return render_chat_template(compiled, messages,
                                        add_generation_prompt=add_generation_prompt,
                                        special_tokens=special, **template_kwargs)
        return render_continuing_final_message(compiled, messages, special_tokens=special,
                                               **template_kwargs)
