"""benchmarks/throughput.py's plumbing on a tiny model: a model path, several attention
backends and the agreement of their greedy tokens (the HF peers run in the real benchmark)."""

import importlib.util
import json
import pathlib
import sys

import pytest

from tests.helpers.tiny_models import make_tiny_llama


@pytest.fixture(scope="module")
def throughput():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("benchmark_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_run_agreement_counts_identical_sequences_and_matching_prefixes(throughput):
    Result = throughput.Result
    first = Result("pagedjax-pallas", 1.0, 4, 6, {"token_ids": [[1, 2, 3], [4, 5, 6]]})
    second = Result("pagedjax-reference", 1.0, 4, 6, {"token_ids": [[1, 2, 3], [4, 9, 6]]})
    peer = Result("hf-continuous", 1.0, 4, 6, {})
    assert throughput.run_agreement([first, peer]) is None
    assert throughput.run_agreement([first, second, peer]) == {
        "sequences": 2, "identical": 1, "tokens": 6, "matching_prefix_tokens": 4}


def test_two_attention_backends_on_a_model_path(throughput, tmp_path, capsys):
    model = make_tiny_llama(tmp_path / "model", num_kv_heads=2, max_position_embeddings=2048)
    out = tmp_path / "results"
    summary = throughput.main(["--model", str(model), "--workload", "mixed", "--scale", "0.04",
                               "--attention-backend", "reference,pallas", "--skip-hf",
                               "--out", str(out)])
    workload = summary["workloads"]["mixed"]
    systems = [row["system"] for row in workload["results"]]
    assert systems == ["pagedjax-reference", "pagedjax-pallas"]
    assert [row["notes"]["attention_backend"] for row in workload["results"]] == [
        "reference", "pallas"]
    assert all(row["output_tokens"] == 2 * 128 for row in workload["results"])
    # float32 on CPU: the interpreted kernel and the reference pick the same greedy tokens
    assert workload["run_agreement"] == {"sequences": 2, "identical": 2, "tokens": 256,
                                             "matching_prefix_tokens": 256}
    saved = json.loads((out / "throughput.json").read_text())
    assert saved["model"] == str(model) and saved["dtype"] == "float32"
    assert "token_ids" not in json.dumps(saved)  # kept for the comparison, not written
    assert "greedy sequences identical across pagedjax runs: 2/2" in capsys.readouterr().out
