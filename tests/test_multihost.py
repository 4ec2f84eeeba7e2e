"""Multi-host on one machine: 2 processes x 2 forced CPU devices run one tp=4 engine
(process 0 schedules and broadcasts each step, process 1 replays it) and give the tokens of a
single-process tp=1 engine (tests/helpers/multihost_check.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from pagedjax import LLM, SamplingParams
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, one_step_shape
from tests.helpers.multihost_check import MULTIHOST_SAMPLING, completions
from tests.helpers.tiny_models import make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """A tiny Llama with 8 query / 4 KV heads: tp=4 splits both."""
    return make_tiny_llama(str(tmp_path_factory.mktemp("multihost") / "gqa"),
                           num_attention_heads=8, num_kv_heads=4, vocab_size=512)


def run_two_processes(command) -> list[str]:
    """`command(rank, port)` in 2 processes with 2 forced CPU devices each; their output
    (both must exit 0)."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [subprocess.Popen(command(rank, port), cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in (0, 1)]
    try:
        logs = [process.communicate(timeout=420)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]
    return logs


def test_two_processes_give_one_process_tokens(tmp_path, gqa_dir):
    model_dir, out_path = gqa_dir, tmp_path / "rank0.json"
    logs = run_two_processes(lambda rank, port: [
        sys.executable, "-m", "tests.helpers.multihost_check", str(rank), str(port),
        model_dir, str(out_path)])
    assert "process 1 replayed" in logs[1]
    results = json.loads(out_path.read_text())
    assert results.pop("local_kv_shards") == 2  # process 0 holds 2 of the 4 KV shards

    reference = one_step_shape(LLM(model_dir, **TINY_ENGINE_SETTINGS), 32, 4)
    for name, params in MULTIHOST_SAMPLING.items():
        expected = completions(reference.generate(TINY_PROMPTS, params, use_tqdm=False))
        assert results[name] == expected, name


def test_the_cli_runs_over_two_processes(gqa_dir):
    """`pagedjax generate` with the multi-host options: process 0 prints one process's
    text, process 1 follows and exits 0."""
    logs = run_two_processes(lambda rank, port: [
        sys.executable, "-m", "pagedjax.cli", "generate", "--model", gqa_dir, "-tp", "4",
        "--max-tokens", "6", "--coordinator-address", f"127.0.0.1:{port}",
        "--num-processes", "2", "--process-id", str(rank), "hello"])
    expected = LLM(gqa_dir, **TINY_ENGINE_SETTINGS).generate(
        ["hello"], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
    assert f">>> hello\n{expected[0].outputs[0].text}\n" in logs[0], logs[0][-2000:]
    assert ">>> hello" not in logs[1]
