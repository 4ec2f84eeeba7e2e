"""The collectives a compiled XLA program runs, read from its HLO text.

What a sharded step moves between devices (benchmarks/sharding.py prints it; the tensor
parallel tests check it): every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute with its bytes, counted once per trip of the loops around it.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def collectives(hlo: str) -> dict[str, list[int]]:
    """Collective kind -> bytes of each execution per program run (a collective inside a
    loop counted once per trip; both branches of a conditional counted)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            computations[current].append(line)
    callers: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = re.search(r"body=%?([\w.\-]+)", line)
            for callee in re.findall(r"(?:calls|to_apply|condition|body|branch_computations|"
                                     r"true_computation|false_computation)=\{?([^}\s]+)",
                                     line):
                for one in callee.split(","):
                    one = one.strip().lstrip("%").rstrip(",")
                    times = int(trips.group(1)) if trips and body and body.group(1) == one else 1
                    callers[one].append((name, times))

    memo: dict[str, int] = {}

    def runs(name: str) -> int:
        if name == entry:
            return 1
        if name not in memo:
            memo[name] = 0  # no cycles in HLO; guards a misparse
            memo[name] = sum(runs(caller) * times for caller, times in callers.get(name, []))
        return memo[name]

    found: dict[str, list[int]] = defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            op = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
            if not op:
                continue
            size = sum(_ITEMSIZE.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",")
                                                                if d] or [1]))
                       for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1)))
            found[op.group(2)] += [size] * runs(name)
    return found
