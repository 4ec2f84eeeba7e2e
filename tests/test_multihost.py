"""Multi-host on one machine: 2 processes x 2 forced CPU devices run one tp=4 engine
(process 0 schedules and broadcasts each step, process 1 replays it) and give the tokens of a
single-process tp=1 engine (tests/helpers/multihost_check.py)."""

import json
import os
import socket
import subprocess
import sys

from pagedjax import LLM
from tests.helpers.engines import TINY_ENGINE_SETTINGS, TINY_PROMPTS, one_step_shape
from tests.helpers.multihost_check import MULTIHOST_SAMPLING, completions
from tests.helpers.tiny_models import make_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_one_process_tokens(tmp_path):
    model_dir = make_tiny_llama(str(tmp_path / "gqa"), num_attention_heads=8, num_kv_heads=4,
                                vocab_size=512)
    out_path, port = tmp_path / "rank0.json", free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.multihost_check", str(rank), str(port),
         model_dir, str(out_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        logs = [process.communicate(timeout=420)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]
    assert "process 1 replayed" in logs[1]
    results = json.loads(out_path.read_text())
    assert results.pop("local_kv_shards") == 2  # process 0 holds 2 of the 4 KV shards

    reference = one_step_shape(LLM(model_dir, **TINY_ENGINE_SETTINGS), 32, 4)
    for name, params in MULTIHOST_SAMPLING.items():
        expected = completions(reference.generate(TINY_PROMPTS, params, use_tqdm=False))
        assert results[name] == expected, name
