"""A host StepInput travels as two packed buffers and comes back out intact on the device."""

import jax
import numpy as np
import pytest

from pagedjax.buckets import BucketKey
from pagedjax.input_transfer import pack, to_device
from pagedjax.runner import step_input_spec


@pytest.mark.parametrize("penalty_width", [0, 16])
def test_every_leaf_arrives_with_its_values_shape_and_dtype(penalty_width):
    spec = step_input_spec(BucketKey(32, 8, penalty_width=penalty_width), pages_per_seq=5)
    rng = np.random.default_rng(0)

    def random_leaf(s):
        if s.dtype == np.float32:
            return rng.standard_normal(s.shape).astype(np.float32)
        if s.dtype == np.uint32:  # seed words use all 32 bits
            return rng.integers(0, 2 ** 32, s.shape, dtype=np.uint64).astype(np.uint32)
        return rng.integers(-2 ** 31, 2 ** 31, s.shape, dtype=np.int64).astype(np.int32)

    host = jax.tree.map(random_leaf, spec)
    device = to_device(host)
    assert jax.tree.structure(device) == jax.tree.structure(host)
    for sent, got in zip(jax.tree.leaves(host), jax.tree.leaves(device)):
        assert isinstance(got, jax.Array) and got.dtype == sent.dtype
        np.testing.assert_array_equal(np.asarray(got), sent)
    ints, floats, _ = pack(host)  # two buffers hold everything
    assert ints.size + floats.size == sum(leaf.size for leaf in jax.tree.leaves(host))


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="int32, uint32 or float32"):
        pack({"ids": np.zeros(3, np.int64)})
