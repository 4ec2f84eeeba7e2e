"""Building a `Tokenizer` from an HF model directory's tokenizer files.

tokenizer.json is read by the `tokenizers` library; the special tokens come from
tokenizer_config.json and special_tokens_map.json (then generation_config.json and
config.json for ids), the chat template from chat_template.jinja or tokenizer_config.json.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import tokenizers

from .tokenizer import Tokenizer


def tokenizer_from_hf_dir(model_dir: str | os.PathLike, cls: type[Tokenizer] = Tokenizer
                          ) -> Tokenizer:
    """Load tokenizer.json (+ tokenizer_config.json, generation_config.json,
    special_tokens_map.json, config.json, chat_template.jinja) from an HF model dir as a
    `cls` (`Tokenizer.from_hf_dir` passes its own class)."""
    model_dir = os.fspath(model_dir)
    tok_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
        if os.path.isfile(os.path.join(model_dir, "tokenizer.model")):
            raise ValueError(
                f"{model_dir} has only a sentencepiece tokenizer.model; pagedjax needs "
                "tokenizer.json (save the tokenizer with a fast HF tokenizer to create it)"
            )
        raise ValueError(f"{model_dir} has no tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(tok_path)
    except Exception as err:  # tokenizers raises its own Exception type
        raise ValueError(f"cannot read {tok_path}: {err}") from err

    tok_config = _read_json(model_dir, "tokenizer_config.json")
    special_map = _read_json(model_dir, "special_tokens_map.json")
    gen_config = _read_json(model_dir, "generation_config.json")
    model_config = _read_json(model_dir, "config.json")

    def token_id(key: str) -> Optional[int]:
        # tokenizer_config wins over special_tokens_map (transformers' order).
        for source in (tok_config, special_map):
            content = _token_content(source.get(key))
            if content is not None:
                return backend.token_to_id(content)
        return None

    bos = token_id("bos_token")
    if bos is None:
        bos = _first_id(gen_config.get("bos_token_id", model_config.get("bos_token_id")))
    eos = token_id("eos_token")
    eos_ids = set()
    for source in (gen_config, model_config):
        eos_ids.update(_id_list(source.get("eos_token_id")))
    if eos is None and eos_ids:
        # generation_config lists the primary EOS first.
        eos = _id_list(gen_config.get("eos_token_id") or model_config.get("eos_token_id"))[0]
    pad = token_id("pad_token")
    if pad is None:
        pad = _first_id(gen_config.get("pad_token_id", model_config.get("pad_token_id")))

    template, named = _hf_chat_template(model_dir, tok_config)
    return cls(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        unk_token_id=token_id("unk_token"),
        add_bos_token=bool(tok_config.get("add_bos_token", False)),
        chat_template=template,
        named_chat_templates=named,
    )


def _read_json(model_dir: str, name: str) -> dict[str, Any]:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_content(value: Any) -> Optional[str]:
    # tokenizer_config writes special tokens as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _first_id(value: Any) -> Optional[int]:
    ids = _id_list(value)
    return ids[0] if ids else None


def _hf_chat_template(model_dir: str, tok_config: dict[str, Any]) -> tuple[Optional[str], dict[str, str]]:
    """The default chat template and any named ones.

    Newer transformers saves the template to chat_template.jinja; older ones keep it in
    tokenizer_config.json, as a string or a list of {"name", "template"} entries."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), {}
    value = tok_config.get("chat_template")
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value
                 if isinstance(t, dict) and "name" in t and "template" in t}
        return named.get("default"), named
    return (value if isinstance(value, str) else None), {}
