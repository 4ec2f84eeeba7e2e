"""Tensor and data parallelism: the engine over a mesh of 8 forced CPU devices gives tp=1's
tokens, holds 1/tp of the KV pool and weights per device, moves only the expected
collectives, and takes a trainer's sharded params without recompiling (tests/helpers/tensor_parallel_check.py, in a subprocess: the device
count must be set before JAX starts); bad parallel options are ValueErrors naming the
option."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from pagedjax import LLM
from pagedjax.config import EngineConfig
from tests.helpers.engines import TINY_ENGINE_SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensor_parallel_on_eight_devices(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-m", "tests.helpers.tensor_parallel_check", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    for tp in (2, 4, 8):
        assert f"tp={tp}: same greedy tokens" in result.stdout
    assert "trainer-sharded params" in result.stdout
    assert "all-gather of the logits, nothing else" in result.stdout
    assert "reference and pallas backends per shard" in result.stdout
    assert "tp=2 gives tp=1's greedy tokens on every zoo family" in result.stdout
    assert "bad meshes rejected" in result.stdout
    assert "tp=3 gives tp=1's greedy tokens on the default model" in result.stdout
    assert "dp=2 x tp=2 (sizes, and a (dp, tp) mesh): same greedy and seeded" in result.stdout


@pytest.mark.parametrize("field, value", [("tensor_parallel_size", 0),
                                          ("data_parallel_size", 0),
                                          ("tensor_parallel_size", True)])
def test_parallel_sizes_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_options_the_devices_cannot_serve_are_rejected(tiny_llama_dir):
    assert len(jax.devices()) == 1  # the suite's own process: one CPU device
    cases = [(dict(tensor_parallel_size=2), "tensor_parallel_size"),
             (dict(data_parallel_size=2), "data_parallel_size"),
             (dict(mesh="tp"), "mesh"),
             (dict(mesh=Mesh(np.array(jax.devices()), ("x",))), "mesh")]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            LLM(tiny_llama_dir, **TINY_ENGINE_SETTINGS, **kwargs)


def test_cli_passes_the_parallel_sizes_to_the_engine(tiny_llama_dir):
    result = subprocess.run(
        [sys.executable, "-m", "pagedjax.cli", "generate", "--model", tiny_llama_dir,
         "-tp", "2", "--data-parallel-size", "1", "hi"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2 and "tensor_parallel_size=2" in result.stderr, result.stderr
