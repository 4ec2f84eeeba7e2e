"""`pagedjax generate` end to end in a subprocess, and its errors."""

import os
import subprocess
import sys


def run_cli(*args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pagedjax.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_prints_texts_and_throughput(tiny_llama_dir):
    result = run_cli("generate", "--model", tiny_llama_dir, "--max-tokens", "6",
                     "--max-model-len", "64", "--num-blocks", "40", "the cat", "a dog")
    assert result.returncode == 0, result.stderr
    assert ">>> the cat" in result.stdout and ">>> a dog" in result.stdout
    assert "2 prompts, 12 tokens in" in result.stdout
    assert "tokens/s" in result.stdout


def test_bad_arguments_exit_2_with_the_field_named(tiny_llama_dir, tmp_path):
    result = run_cli("generate", "--model", tiny_llama_dir, "--max-tokens", "0", "hi")
    assert result.returncode == 2 and "max_tokens" in result.stderr
    result = run_cli("generate", "--model", tiny_llama_dir, "--num-scheduler-steps", "0", "hi")
    assert result.returncode == 2 and "num_scheduler_steps" in result.stderr
    result = run_cli("generate", "--model", str(tmp_path / "missing"), "hi",
                     env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 2 and "not found" in result.stderr


def test_engine_flags_reach_the_engine_config():
    from pagedjax.cli import _build_parser, _engine_kwargs

    args = _build_parser().parse_args(["serve", "--num-scheduler-steps", "8",
                                       "--async-scheduling", "--min-token-bucket", "16"])
    kwargs = _engine_kwargs(args)
    assert kwargs["num_scheduler_steps"] == 8 and kwargs["async_scheduling"] is True
    assert kwargs["min_token_bucket"] == 16
    defaults = _engine_kwargs(_build_parser().parse_args(["serve"]))
    assert defaults["async_scheduling"] is False and defaults["min_token_bucket"] is None


def test_prefix_caching_flags_on_both_commands():
    from pagedjax.cli import _build_parser, _engine_kwargs

    for command in ("serve", "generate"):
        extra = [] if command == "serve" else ["hi"]
        default = _engine_kwargs(_build_parser().parse_args([command, *extra]))
        off = _engine_kwargs(_build_parser().parse_args(
            [command, "--no-enable-prefix-caching", "--prefix-caching-hash-algo", "sha256",
             *extra]))
        assert default["enable_prefix_caching"] is True
        assert default["prefix_caching_hash_algo"] == "builtin"
        assert off["enable_prefix_caching"] is False
        assert off["prefix_caching_hash_algo"] == "sha256"
