"""Building a `Tokenizer` from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token strings,
their types, BPE merges (byte-level "gpt2" vocabularies) or scores (sentencepiece "llama"
vocabularies), the special ids and a pre-tokenizer name (`tokenizer.ggml.pre`). The
pre-tokenizer name selects the text-splitting rule the merges were learned with; it must
match the model's original tokenizer.json or ids silently differ, so an unknown name is an
error rather than a guess.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from .tokenizer import Tokenizer

# llama.cpp token types (llama_token_type in llama.cpp's vocab).
_CONTROL = 3
_USER_DEFINED = 4

# Llama 3's split regex, as in its tokenizer.json; llama.cpp calls it "llama-bpe".
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)


def _pre_tokenizer(pre: Optional[str]) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for llama.cpp's `tokenizer.ggml.pre` name."""
    if pre in ("smollm",):
        # SmolLM/SmolLM2's tokenizer.json: every digit is its own pre-token, then GPT-2's
        # byte-level regex.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]), False
    if pre in ("gpt-2", "gpt2", None):
        # Files written before llama.cpp recorded a pre-tokenizer are GPT-2 style.
        return _byte_level(True), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama 3's tokenizer.json sets ignore_merges: a pre-token that is itself in the
        # vocabulary is taken whole.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            _byte_level(False),
        ]), True
    raise ValueError(
        f"GGUF tokenizer pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported yet; "
        "supported: smollm, gpt-2, llama-bpe"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pre_tok, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Vocabularies store tokens in the byte alphabet; a token that is not (some files keep
    # special tokens as plain UTF-8) is respelled so the byte-level model can reach it.
    # A token listed twice maps to its last id, as in llama.cpp and transformers.
    vocab = {
        (tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))): i
        for i, tok in enumerate(tokens)
    }
    merges = []
    for line in meta["tokenizer.ggml.merges"]:
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"GGUF tokenizer merge {line!r} is not two space-separated tokens")
        merges.append((pair[0], pair[1]))

    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges,
    ))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()

    # A control token spelled outside the byte alphabet is a mislabel in the file (it
    # could not be a real byte-level token), so it stays ordinary, as in transformers.
    _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [], vocab,
                        control_ok=lambda tok: set(tok) <= alphabet)
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary (GGUF stores scores, not merges).

    Every split of a token into two vocabulary tokens is a merge ranked by the token's
    score, best first; ties go to longer left then right pieces, and pieces of one token
    are ordered by id. This is the order transformers derives for the same vocabulary.
    """
    # A token listed twice keeps its last id and score, as in llama.cpp and transformers.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for tok, score in dict(zip(tokens, scores)).items():
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok))
                 if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        ranked.extend(local)
    # A stable sort, like transformers', so equal keys keep the order built above.
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _sentencepiece_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """Llama/Mistral-style sentencepiece BPE: '▁' for spaces and <0xNN> byte fallback."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF sentencepiece tokenizer has no tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=_sentencepiece_merges(tokens, scores), dropout=None,
        unk_token=tokens[int(unk_id)] if unk_id is not None else None,
        fuse_unk=True, byte_fallback=True,
    ))
    # sentencepiece marks word starts with '▁' and adds one before the text (unless the
    # file says add_space_prefix=false); decoding undoes both.
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [], vocab,
                        control_ok=lambda tok: True)
    return backend


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int],
                        vocab: Mapping[str, int], control_ok) -> None:
    # Control tokens (<|im_start|>, <s>, ...) must match whole and be skippable when
    # decoding; user-defined tokens (e.g. <think>) match whole but are ordinary text.
    special = [AddedToken(tok, special=True, normalized=False)
               for tok, kind in zip(tokens, types) if kind == _CONTROL and control_ok(tok)]
    if special:
        backend.add_special_tokens(special)
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, types) if kind == _USER_DEFINED and tok in vocab]
    if user:
        backend.add_tokens(user)


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> Tokenizer:
    """A `Tokenizer` from GGUF metadata (field name -> value, as `GGUFReader` decodes it)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    if model == "gpt2":
        backend = _byte_level_bpe(meta)
        default_add_bos = False
    elif model == "llama":
        backend = _sentencepiece_bpe(meta)
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        default_add_bos = True
    else:
        raise ValueError(
            f"GGUF tokenizer model tokenizer.ggml.model={model!r} is not supported yet; "
            "supported: gpt2 (byte-level BPE), llama (sentencepiece BPE)"
        )

    def get_id(key: str) -> Optional[int]:
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    eos = get_id("eos_token_id")
    # llama.cpp ends generation on any end-of-generation token: eos, eot (end of turn) and
    # eom (end of message) when the file names them.
    eos_ids = [i for i in (eos, get_id("eot_token_id"), get_id("eom_token_id")) if i is not None]
    return Tokenizer(
        backend,
        bos_token_id=get_id("bos_token_id"),
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        pad_token_id=get_id("padding_token_id"),
        unk_token_id=get_id("unknown_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
