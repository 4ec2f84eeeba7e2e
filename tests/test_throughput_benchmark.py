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


def test_device_busy_seconds_weighs_each_key_by_its_calls(throughput):
    class Runner:  # replaying input x of key k "takes" k * x seconds
        def __init__(self):
            self.replayed = []

        def replay_seconds(self, key, step_input, targets):
            self.replayed.append((key, step_input))
            return key * step_input

    calls = [(10, x, None) for x in (1, 2, 3, 4, 5)] + [(100, x, None) for x in (7, 9)]
    runner = Runner()
    # key 10: calls 1, 3 and 5 replayed (spread over the pass), mean 3 x 10 s for 5 calls;
    # key 100: both calls, mean 800 s for 2 calls
    assert throughput.device_busy_seconds(runner, calls, samples_per_key=3) == 5 * 30 + 2 * 800
    assert sorted(runner.replayed) == [(10, 1), (10, 3), (10, 5), (100, 7), (100, 9)]


def test_host_overhead_counts_device_calls_with_and_without_multi_step(throughput, tmp_path):
    model = make_tiny_llama(tmp_path / "model", num_kv_heads=2, max_position_embeddings=2048)
    summary = throughput.main(["--model", str(model), "--workload", "decode-heavy",
                               "--scale", "0.02", "--num-scheduler-steps", "1,4",
                               "--async-scheduling", "off,on",
                               "--attention-backend", "reference", "--skip-hf",
                               "--out", str(tmp_path / "results")])
    rows = summary["workloads"]["decode-heavy"]["results"]
    assert [row["system"] for row in rows] == ["pagedjax-k1", "pagedjax-k1-async",
                                               "pagedjax-k4", "pagedjax-k4-async"]
    one, one_async, four, four_async = (row["notes"] for row in rows)
    for notes in (one, one_async):  # the prefill, then one decode per call
        assert notes["device_calls"] == 1 + 255
    for notes in (four, four_async):  # 4 decode steps per call, a few single ones
        assert notes["device_calls"] < 1 + 255 / 3
    for notes in (one, one_async, four, four_async):
        # a tiny model's calls are dispatch-bound: no range to check
        assert notes["device_busy_seconds"] > 0 and notes["host_overhead_replayed"] < 1
    # on CPU the target reads the host's waits where calls aren't chained, else the replay
    assert one["host_overhead"] == one["host_overhead_waited"] is not None
    for notes in (one_async, four, four_async):
        assert notes["host_overhead_waited"] is None
        assert notes["host_overhead"] == notes["host_overhead_replayed"]
    assert summary["workloads"]["decode-heavy"]["run_agreement"]["identical"] == 3 * 2
