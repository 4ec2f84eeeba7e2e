"""Progress bar for `generate`: tqdm.auto picks the notebook widget inside Jupyter."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from .outputs import RequestOutput


class GenerateProgress:
    """Counts finished prompts and shows prompt-in / tokens-out throughput."""

    def __init__(self, total: int, enabled: bool):
        self._bar = tqdm(total=total, desc="Processed prompts", unit="prompt",
                         dynamic_ncols=True) if enabled else None
        self._start = time.perf_counter()
        self._prompt_tokens = 0
        self._output_tokens = 0

    def update(self, output: RequestOutput) -> None:
        """Record one finished prompt (all its completions)."""
        if self._bar is None:
            return
        self._prompt_tokens += len(output.prompt_token_ids)
        self._output_tokens += sum(len(c.token_ids) for c in output.outputs)
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(
            f"input: {self._prompt_tokens / elapsed:.1f} toks/s, "
            f"output: {self._output_tokens / elapsed:.1f} toks/s", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Close the bar (safe to call twice)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
