"""Structured outputs: what a request may generate, as a grammar over the vocabulary.

`StructuredOutputsParams` (vLLM's names) says what the output must match: a JSON schema, a
regex, one of a list of choices, an EBNF / Lark grammar, or any JSON object. The grammar
engine is llguidance: `GrammarCompiler` turns the params into a grammar for the model's
tokenizer (once per request, so a bad schema is a ValueError before anything is queued) and
gives each sequence a `GrammarState`: a matcher that follows the sequence's output tokens
and yields the step's allowed-token bitmask. Packing those masks into a step is
grammar_bitmasks.py's; applying them on the device is token_bitmask.py's.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence, Union

import numpy as np

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Between JSON tokens: at most one line break and an indentation of 20 spaces or tabs.
# Unbounded whitespace lets a sampled model pad forever (newline after newline), never
# closing the object; this still allows pretty-printed JSON up to five levels deep.
JSON_WHITESPACE = r"(?:\r?\n)?[\x20\x09]{0,20}"
_MATCHER_CACHE_SIZE = 64  # compiled grammars kept per engine (fresh matchers to copy)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on a request's output (vLLM's StructuredOutputsParams).

    `json`: a JSON schema (dict or JSON text) the output must validate against;
    `regex`: a regular expression the whole output must match; `choice`: the output is
    exactly one of these strings; `grammar`: an EBNF (GBNF, `root ::= ...`) or Lark
    (`start: ...`) grammar; `json_object=True`: any JSON object. Between JSON tokens go
    at most a line break and 20 spaces or tabs (JSON_WHITESPACE), none with
    `disable_any_whitespace`. The output ends with EOS once the constraint is complete (a
    `max_tokens` cut can still leave it unfinished).
    """

    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[Sequence[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: set exactly one of {', '.join(KINDS)}, "
                             f"got {', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as error:
                raise ValueError(f"structured_outputs.json: not valid JSON: {error}") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), "
                             f"got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, "
                                 f"got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)):
                raise ValueError(f"structured_outputs.choice must be a list of strings, "
                                 f"got {self.choice!r}")
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a bool, "
                             f"got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"structured_outputs.disable_any_whitespace must be a bool, "
                             f"got {self.disable_any_whitespace!r}")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of KINDS."""
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    @classmethod
    def from_dict(cls, value: dict) -> "StructuredOutputsParams":
        """From a JSON body's object (the server's `structured_outputs`); unknown keys are
        a ValueError naming them."""
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unknown keys {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**value)


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON grammar format) for `params`; not validated yet."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        options = ({"whitespace_flexible": False} if params.disable_any_whitespace else
                   {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE})
        options["coerce_one_of"] = True
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        # Lark string literals take JSON's escapes.
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    source = params.grammar
    if "::=" in source:  # GBNF (llama.cpp's EBNF), as vLLM takes it
        try:
            source = gbnf_to_lark(source)
        except Exception as error:  # noqa: BLE001 - the converter raises its own types
            raise ValueError(f"structured_outputs.grammar: {error}") from None
    return LLMatcher.grammar_from_lark(source)


class GrammarState:
    """One sequence's place in its grammar: a matcher fed with the sequence's output
    tokens, and the bitmask [W] int32 of the tokens allowed next (bit t % 32 of word
    t // 32), computed for `num_tokens` consumed tokens."""

    def __init__(self, matcher: Any):
        self.matcher = matcher  # an llguidance LLMatcher
        self.num_tokens = 0  # output tokens consumed so far
        self.mask: Optional[np.ndarray] = None
        self._mask_at = -1  # num_tokens `mask` was computed at

    @property
    def mask_ready(self) -> bool:
        """True when `mask` is the one for the next token."""
        return self._mask_at == self.num_tokens

    def set_mask(self, mask: np.ndarray) -> None:
        """Record `mask` [W] as the bitmask of the next token."""
        self.mask = mask
        self._mask_at = self.num_tokens

    def fork(self) -> "GrammarState":
        """An independent copy at the same place (a parallel-sampling child's own state)."""
        state = GrammarState(self.matcher.deep_copy())
        state.num_tokens = self.num_tokens
        return state

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Follow the sequence's output: consume tokens not seen yet, or roll back ones
        that are gone. A token the grammar refuses puts the matcher in its error state,
        whose mask allows only EOS, so the sequence ends."""
        count = len(output_token_ids)
        if count < self.num_tokens:
            if not self.matcher.rollback(self.num_tokens - count):
                self.matcher.reset()
                self.num_tokens = 0
            else:
                self.num_tokens = count
        if count > self.num_tokens:
            self.matcher.consume_tokens([int(t) for t in output_token_ids[self.num_tokens:]])
            self.num_tokens = count


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one engine's tokenizer and vocabulary; keeps
    the last few compiled grammars, so requests sharing a schema share the work."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]):
        self.tokenizer = tokenizer  # None: no structured outputs
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._ll_tokenizer = None  # built on first use (half a second for a big vocab)
        self._fresh: OrderedDict[str, Any] = OrderedDict()  # grammar text -> matcher

    def state_for(self, params: StructuredOutputsParams) -> GrammarState:
        """A GrammarState at the start of `params`'s grammar; ValueError naming the
        problem for an invalid or unsupported schema, regex or grammar."""
        from llguidance import LLMatcher

        try:
            grammar = grammar_text(params)
        except ValueError as error:
            if str(error).startswith("structured_outputs"):
                raise
            raise ValueError(f"structured_outputs.{params.kind}: {error}") from None
        fresh = self._fresh.get(grammar)
        if fresh is None:
            tokenizer = self._tokenizer()
            error = LLMatcher.validate_grammar(grammar, tokenizer)
            if error:
                raise ValueError(f"structured_outputs.{params.kind}: {_error_text(error)}")
            fresh = LLMatcher(tokenizer, grammar, log_level=0)
            if fresh.is_error():
                raise ValueError(f"structured_outputs.{params.kind}: "
                                 f"{_error_text(fresh.get_error())}")
            self._fresh[grammar] = fresh
            if len(self._fresh) > _MATCHER_CACHE_SIZE:
                self._fresh.popitem(last=False)
        else:
            self._fresh.move_to_end(grammar)
        return GrammarState(fresh.deep_copy())

    def _tokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            from llguidance import LLTokenizer

            backend = getattr(self.tokenizer, "backend", None)
            if backend is None or not hasattr(backend, "to_str"):
                raise ValueError("structured_outputs: constrained decoding needs the model's "
                                 "tokenizer (a `tokenizers` one), and this engine has none")
            if not self.eos_token_ids:
                raise ValueError("structured_outputs: the model has no EOS token to end a "
                                 "constrained output with")
            self._ll_tokenizer = LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                             eos_token=sorted(self.eos_token_ids))
        return self._ll_tokenizer


def _error_text(message: str) -> str:
    """llguidance's error text without the parser-state dump it may append."""
    return message.strip().split("\n<state>")[0].strip()
