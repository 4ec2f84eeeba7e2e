"""Saving and loading params pytrees with orbax.

A pagedjax checkpoint is a directory:

    pagedjax_config.json   {"format": "pagedjax-orbax", "format_version": 1, "config": {...}}
    params/                the params pytree (models/params.py), an orbax PyTree checkpoint
    tokenizer.json, tokenizer_config.json, generation_config.json   (when saved with one)

`LLM(model=dir)` recognizes it by pagedjax_config.json (written last, so a directory with
it is complete). `load_params(dir, config=cfg)` also reads a plain orbax checkpoint that a
training loop saved itself, holding the params dict or `{"params": params}` (other entries,
e.g. an optimizer state, are not read).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from pagedjax.models.config import ModelConfig
from pagedjax.models.params import check_params, expected_shapes

from .flax_params import params_from_flax

CONFIG_FILE = "pagedjax_config.json"
PARAMS_DIR = "params"
FORMAT = "pagedjax-orbax"
FORMAT_VERSION = 1


def is_pagedjax_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `save_params`."""
    return os.path.isfile(os.path.join(os.fspath(path), CONFIG_FILE))


# ---- config --------------------------------------------------------------------------


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The config as JSON-ready data (nested dataclasses, e.g. RopeScaling, as dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; ValueError on a field ModelConfig does not have."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{CONFIG_FILE}: unknown ModelConfig field(s) {', '.join(unknown)} "
                         "(saved by a newer pagedjax?)")
    kwargs = {}
    for name, value in data.items():
        field = fields[name]
        default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                   else field.default)
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = type(default)(**{k: _tuples(v) for k, v in value.items()})
        kwargs[name] = _tuples(value)
    return ModelConfig(**kwargs)


def _tuples(value: Any) -> Any:
    # JSON has no tuples; a frozen, hashable config needs them.
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---- tokenizer -----------------------------------------------------------------------


def save_tokenizer(tokenizer: Any, path: str | os.PathLike) -> None:
    """Write a `pagedjax.loading.Tokenizer` as HF files that `Tokenizer.from_hf_dir` reads:
    tokenizer.json, tokenizer_config.json (special tokens, chat template(s)) and
    generation_config.json (every EOS id)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer.backend.save(os.path.join(path, "tokenizer.json"))
    template: Any = tokenizer.chat_template
    if tokenizer.named_chat_templates:
        named = dict(tokenizer.named_chat_templates)
        if tokenizer.chat_template is not None:
            named.setdefault("default", tokenizer.chat_template)
        template = [{"name": n, "template": t} for n, t in named.items()]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.id_to_token(tokenizer.bos_token_id),
        "eos_token": tokenizer.id_to_token(tokenizer.eos_token_id),
        "pad_token": tokenizer.id_to_token(tokenizer.pad_token_id),
        "unk_token": tokenizer.id_to_token(tokenizer.unk_token_id),
        "add_bos_token": tokenizer.add_bos_token,
        "chat_template": template,
    }
    eos_ids = sorted(tokenizer.eos_token_ids)
    if tokenizer.eos_token_id is not None:  # the primary EOS first, as HF writes it
        eos_ids = [tokenizer.eos_token_id] + [i for i in eos_ids if i != tokenizer.eos_token_id]
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids,
                  "pad_token_id": tokenizer.pad_token_id}
    for name, data in (("tokenizer_config.json", tok_config),
                       ("generation_config.json", generation)):
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)


# ---- params --------------------------------------------------------------------------


def save_params(path: str | os.PathLike, params: Any, config: ModelConfig,
                tokenizer: Any = None, *, overwrite: bool = False) -> str:
    """Save `params` (a params dict, linen variables or NNX state; see
    `params_from_flax`) with orbax, plus `config` and optionally `tokenizer`, to the
    directory `path`. Returns the absolute path; `LLM(path)` serves it.

    An existing non-empty directory is a ValueError unless `overwrite=True`.
    """
    import orbax.checkpoint as ocp

    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
    params = params_from_flax(params)
    check_params(params, config)
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{path} exists and is not a directory")
        if os.listdir(path) and not overwrite:
            raise ValueError(f"{path} is not empty; pass overwrite=True to replace it")
        marker = os.path.join(path, CONFIG_FILE)
        if os.path.exists(marker):
            os.remove(marker)  # the directory is incomplete until it is written again
    os.makedirs(path, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.join(path, PARAMS_DIR), params, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    if tokenizer is not None:
        save_tokenizer(tokenizer, path)
    with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION,
                   "config": config_to_dict(config)}, f, indent=2)
    return path


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig saved in a pagedjax checkpoint directory."""
    file = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{file} is not a pagedjax checkpoint config")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {data['format_version']}; this pagedjax "
                         f"reads up to {FORMAT_VERSION}")
    return config_from_dict(data["config"])


def load_params(path: str | os.PathLike, config: Optional[ModelConfig] = None,
                dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from a `save_params` directory, or from a plain orbax checkpoint
    of a params pytree (the dict itself or `{"params": dict}`) when `config` is given.

    Arrays are restored straight onto the default device as jax arrays, in `dtype`
    (default: the dtype they were saved in).
    """
    import jax
    import jax.numpy as jnp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path} does not exist")
    if is_pagedjax_checkpoint(path):
        saved = read_checkpoint_config(path)
        if config is not None and config != saved:
            raise ValueError(f"config differs from the one saved in {path}/{CONFIG_FILE}")
        config, directory = saved, os.path.join(path, PARAMS_DIR)
    elif config is None:
        raise ValueError(f"{path} is not a pagedjax checkpoint (no {CONFIG_FILE}); pass "
                         "config= to load a plain orbax checkpoint of a params pytree")
    else:
        directory = path
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")

    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        try:
            stored = checkpointer.metadata(directory).item_metadata.tree
        except Exception as err:  # orbax raises several types for a non-checkpoint dir
            raise ValueError(f"{directory} is not an orbax checkpoint: {err}") from err
        # Find the params inside linen-style wrappers: {"params": {...}}.
        wrappers: list[str] = []
        node = stored
        while isinstance(node, dict) and "embed" not in node and "params" in node:
            wrappers.append("params")
            node = node["params"]
        check_params(node, config)  # names the first missing / extra / mis-shaped tensor
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(
            lambda meta, shape: jax.ShapeDtypeStruct(
                shape, jnp.dtype(dtype) if dtype is not None else meta.dtype, sharding=sharding),
            node, expected_shapes(config),
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
        for key in reversed(wrappers):
            target = {key: target}
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    finally:
        checkpointer.close()
    for key in wrappers:
        restored = restored[key]
    check_params(restored, config)
    return config, restored
