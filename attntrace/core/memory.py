"""Memory you can predict: what a run will allocate, from the plan alone, before it allocates it.

The plan knows every shape, so the peak is a sum:

    inputs      the spec's arrays as the run reads them (cast to the run's dtype)
    retained    every array the trace keeps (keep="all", hooked steps, small ones by default)
    working     the largest step's working buffers: the score buffer the score steps share
                (they work in place), a second one when a score step is kept, and numpy's
                temporaries; for chunked attention, one tile (see core.chunked.working_bytes)

A run that would not fit in the memory available is refused before numpy runs, with the
estimate, what is available, and the options that would fit (:func:`advice`).

The score buffer of a long run is not given back when the run ends: :data:`SCORE_BUFFER` holds
on to it, and the next run of the same shape writes into it instead of asking the OS for fresh
pages (whose first touch costs as much as a third of the product Q·Kᵀ: 35 ms of 85 at 2,048
tokens here).  :func:`release_buffers` (``attntrace.release_buffers()``) lets it go.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

MiB = 1 << 20
AUTO_KEEP_ELEMENTS = 1 << 20        # must equal core.engine.AUTO_KEEP_ELEMENTS (the engine imports it from here)
SAFETY = 1.10                       # refuse when the estimate, plus this margin, exceeds what is free


@dataclass
class MemoryEstimate:
    inputs: int
    retained: int
    working: int
    dtype: str
    parts: Dict[str, int] = field(default_factory=dict)     # the biggest retained arrays, by hook

    @property
    def peak(self) -> int:
        return self.inputs + self.retained + self.working

    def to_json(self) -> Dict:
        return {"peak": self.peak, "inputs": self.inputs, "retained": self.retained, "working": self.working,
                "dtype": self.dtype}


def _spec_inputs(spec, plan, itemsize: int) -> int:
    if spec is None:
        return _plan_inputs(plan, itemsize)
    total = 0
    for array in _arrays(spec):
        total += int(getattr(array.data, "size", 0)) * itemsize
    return total


def _plan_inputs(plan, itemsize: int) -> int:
    """Sizes only (explain-shapes from flags): the embeddings and one layer's four projections."""
    d = plan.size
    d_model = d("d_model")
    embeddings = d("batch") * (d("seq_q") + (d("seq_k") if plan.cross else 0)) * d_model
    projections = d_model * (d("n_heads") * d("d_head") + d("n_kv_heads") * (d("d_head") + d("d_v")))
    if plan.has_w_o:
        projections += d("n_heads") * d("d_v") * d("d_out")
    return (embeddings + projections) * itemsize


def _arrays(spec):
    if spec.source is not None:
        yield spec.source.embeddings
    if spec.encoder is not None:
        yield spec.encoder.embeddings
    for block in spec.blocks:
        att = block.attention
        for name in ("W_q", "W_k", "W_v", "W_o", "b_q", "b_k", "b_v", "b_o"):
            if getattr(att, name) is not None:
                yield getattr(att, name)
        if block.mlp is not None:
            yield from block.mlp.weights.values()


def estimate(spec, plan, dtype: str = "float64", kept: Optional[Set[str]] = None) -> MemoryEstimate:
    """The peak a run of `plan` needs. kept: the hooks the trace keeps (None: "auto", small arrays).
    spec None: sizes only, the inputs counted from the plan."""
    itemsize = 4 if dtype == "float32" else 8
    retained, parts = 0, {}
    for step in plan.steps:
        nbytes = plan.result_bytes(step, itemsize)
        keep = step is plan.steps[-1] or (      # the engine always keeps the output
            nbytes // itemsize <= AUTO_KEEP_ELEMENTS if kept is None else step.hook in kept)
        if keep:
            retained += nbytes
            parts[step.hook] = nbytes
    working = max((_working(plan, step, itemsize, kept) for step in plan.steps), default=0)
    biggest = dict(sorted(parts.items(), key=lambda kv: -kv[1])[:4])
    return MemoryEstimate(_spec_inputs(spec, plan, itemsize), retained, working, dtype, biggest)


def _working(plan, step, itemsize: int, kept: Optional[Set[str]]) -> int:
    block = plan.block(step.layer)
    b, h, q, k = (plan.size(n) for n in ("batch", "n_heads", "seq_q", "seq_k"))
    if step.key == "block_max":
        from attntrace.core import chunked  # only chunked runs load it
        sizes = chunked.working_bytes(b, h, plan.size("n_kv_heads"), q, k, plan.size("d_head"), plan.size("d_v"),
                                      block.chunk, block.chunk, itemsize, keep=block.masked,
                                      bias=plan.positional == "alibi", stats=True, traced_rows=1)
        return sizes["working"] + sizes["results"]
    if step.point.axes[-2:] == ("seq_q", "seq_k"):
        scores = b * h * q * k * itemsize
        # in place, one buffer; a kept or hooked input forces a copy; softmax's max and sums are small
        copies = 2 if kept is not None and step.hook in kept else 1
        return copies * scores + 2 * b * h * q * itemsize
    return 2 * plan.result_bytes(step, itemsize)


def available_bytes() -> Optional[int]:
    """Free memory: MemAvailable, capped by a cgroup limit when one is set (containers); None if unknown."""
    found = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = _read_text(limit_file)
            if limit.isdigit() and int(limit) < (1 << 60):
                used = int(_read_text(usage_file))
                free = max(int(limit) - used, 0)
                found = free if found is None else min(found, free)
            break
        except (OSError, ValueError):
            continue
    return None if found is None else found + SCORE_BUFFER.held


class ReusableBuffer:
    """One array a run may write into again: :meth:`empty` hands out the buffer of the last call
    when its shape and dtype match and nobody holds it (no trace keeps it, no view of it lives:
    its reference count says so), else a new one (the old one let go first, so peaks never add)."""

    def __init__(self):
        self._lock = threading.Lock()            # runs on two threads: one of them gets the buffer
        self._buffer: Optional[np.ndarray] = None

    def empty(self, shape: Tuple[int, ...], dtype) -> np.ndarray:
        with self._lock:
            buffer, self._buffer = self._buffer, None
            # references: `buffer` here and getrefcount's argument; any other is a user's
            if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != np.dtype(dtype) or \
                    sys.getrefcount(buffer) > 2:
                buffer = None
                buffer = np.empty(shape, dtype=dtype)
            self._buffer = buffer
            return buffer

    @property
    def held(self) -> int:
        """Bytes held for reuse (counted as available: a run reuses or frees them first)."""
        buffer = self._buffer
        return 0 if buffer is None or sys.getrefcount(buffer) > 3 else buffer.nbytes

    def release(self) -> None:
        with self._lock:
            self._buffer = None


SCORE_BUFFER = ReusableBuffer()


def release_buffers() -> None:
    """Free the score buffer attntrace keeps for the next run (the memory of one (batch, heads,
    seq_q, seq_k) array: 192 MiB at 2,048 tokens, 12 heads, float32)."""
    SCORE_BUFFER.release()


def _read_text(path: str) -> str:
    with open(path, encoding="ascii") as f:
        return f.read().strip()


def human(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


def advice(spec, plan_for, dtype: str, kept: Optional[Set[str]], available: int) -> List[str]:
    """What would fit: chunked attention, keeping less, float32 — each with its own estimate.

    plan_for(chunk) plans the spec with that chunk size (None: as asked)."""
    options = []
    for chunk in (1024, 512, 256, 128):
        guess = estimate(spec, plan_for(chunk), dtype, set())
        if guess.peak * SAFETY <= available:
            options.append(f"--chunk {chunk} (chunk={chunk}): online softmax over key blocks, the weights never "
                           f"held — about {human(guess.peak)}")
            break
    if kept:
        lean = estimate(spec, plan_for(None), dtype, set())
        if lean.peak * SAFETY <= available:
            options.append(f"keep fewer arrays (no --export of data; keep=[] in the API): about {human(lean.peak)}")
    if dtype != "float32":
        single = estimate(spec, plan_for(None), "float32", kept)
        if single.peak * SAFETY <= available:
            options.append(f"--dtype float32: about {human(single.peak)}")
    options.append("fewer heads or a shorter sequence; --force runs anyway (the system may kill it)")
    return options
