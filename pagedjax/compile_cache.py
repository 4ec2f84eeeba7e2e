"""JAX's persistent compilation cache, on by default so a second start skips compiles."""

from __future__ import annotations

import os
from typing import Optional

import jax

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "pagedjax", "jax-compilation-cache")


def enable_compilation_cache() -> Optional[str]:
    """Point JAX's persistent compilation cache at a user cache dir; returns the dir in use.

    Respects a cache dir the user already configured in JAX, `PAGEDJAX_CACHE_DIR` to move
    it, and `PAGEDJAX_COMPILATION_CACHE=0` to leave it off (returns None).
    """
    if os.environ.get("PAGEDJAX_COMPILATION_CACHE", "1") == "0":
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    cache_dir = os.path.expanduser(os.environ.get("PAGEDJAX_CACHE_DIR") or DEFAULT_CACHE_DIR)
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Step programs compile in seconds on CPU: cache all of them, however quick.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir
