"""Functional Flax model definitions and their registry (installed as pagedjax.models)."""

from .config import ModelConfig, RopeScaling
from .params import check_params, expected_shapes, split_layer_matrices
from .registry import SUPPORTED_ARCHITECTURES, build_model

__all__ = ["ModelConfig", "RopeScaling", "SUPPORTED_ARCHITECTURES", "build_model",
           "check_params", "expected_shapes", "split_layer_matrices"]
