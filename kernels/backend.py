"""Choosing a paged-attention backend by name and platform."""

from __future__ import annotations

ATTENTION_BACKENDS = ("auto", "reference")


def resolve_attention_backend(name: str, platform: str) -> str:
    """Map a requested backend ("auto" included) to the one that will run on `platform`.

    Only the jnp reference exists so far, so "auto" is "reference" on every platform.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is not supported; choose one of "
            f"{', '.join(ATTENTION_BACKENDS)}")
    del platform  # every platform runs the reference until the Pallas kernels land
    return "reference"
