"""Benchmark: `attntrace run` against the same attention in bare numpy.

    python benchmarks/bench_run.py [--seq 1024] [--d-model 768] [--heads 12] [--repeat 5]

Writes the arrays as .npy files in a temporary folder, then times, in one
process and one run:

* bare numpy: load the .npy files, project, split heads, QKᵀ·scale, softmax,
  ·V, merge heads, W_o -- the math only;
* attntrace.run(spec): the trace alone (the Python API);
* attntrace: `attntrace run spec.yaml` through the real CLI function, with the
  rendering written to /dev/null (spec parsing, .npy loading, pre-flight shape
  checks, every hook, stats, invariant checks, previews and the rich output);
* `attntrace --help` in a fresh interpreter (start-up cost).

Prints median times, the ratio, and peak traced memory (tracemalloc sees
numpy's allocations).  Targets: ratio ≤ 1.3, --help ≤ 0.3 s.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def write_inputs(folder: Path, seq: int, d_model: int, heads: int) -> Path:
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.normal(size=(seq, d_model)))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        np.save(folder / f"{name}.npy", rng.normal(size=(d_model, d_model)) / np.sqrt(d_model))
    spec = folder / "spec.yaml"
    spec.write_text(
        "version: 1\nname: benchmark\nembeddings: {npy: x.npy}\nattention:\n"
        f"  heads: {heads}\n  W_q: {{npy: w_q.npy}}\n  W_k: {{npy: w_k.npy}}\n"
        "  W_v: {npy: w_v.npy}\n  W_o: {npy: w_o.npy}\n  mask: causal\n")
    return spec


def bare_numpy(folder: Path, heads: int) -> np.ndarray:
    x = np.load(folder / "x.npy")
    w_q, w_k, w_v, w_o = (np.load(folder / f"{n}.npy") for n in ("w_q", "w_k", "w_v", "w_o"))
    seq, d_model = x.shape
    d_head = d_model // heads

    def split(t):
        return t.reshape(seq, heads, d_head).transpose(1, 0, 2)

    q, k, v = split(x @ w_q), split(x @ w_k), split(x @ w_v)
    scores = q @ k.transpose(0, 2, 1)
    scores *= 1 / np.sqrt(d_head)
    scores[:, np.triu(np.ones((seq, seq), dtype=bool), k=1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    z = scores @ v
    return z.transpose(1, 0, 2).reshape(seq, d_model) @ w_o


def attntrace_run(spec: Path) -> None:
    from click.testing import CliRunner  # the real command, output discarded

    from attntrace.cli.main import cli
    result = CliRunner().invoke(cli, ["run", str(spec)], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"attntrace run failed:\n{result.output[-2000:]}")


def attntrace_engine(spec: Path) -> None:
    import attntrace  # the Python API: the trace without rendering
    attntrace.run(str(spec))


def measure(fn, repeat: int):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(times), peak


def help_time(repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "attntrace", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = write_inputs(folder, args.seq, args.d_model, args.heads)
        attntrace_run(spec)                               # warm imports and caches
        bare_t, bare_peak = measure(lambda: bare_numpy(folder, args.heads), args.repeat)
        engine_t, engine_peak = measure(lambda: attntrace_engine(spec), args.repeat)
        tool_t, tool_peak = measure(lambda: attntrace_run(spec), args.repeat)
    start_up = help_time(args.repeat)
    mib = 1 << 20
    print(f"seq={args.seq} d_model={args.d_model} heads={args.heads} (causal, float64), median of {args.repeat}")
    print(f"bare numpy          {bare_t * 1000:8.1f} ms   peak {bare_peak / mib:7.1f} MiB")
    print(f"attntrace.run()     {engine_t * 1000:8.1f} ms   peak {engine_peak / mib:7.1f} MiB   "
          f"ratio {engine_t / bare_t:.2f} × (the trace: every hook, stats, checks)")
    print(f"attntrace run       {tool_t * 1000:8.1f} ms   peak {tool_peak / mib:7.1f} MiB   "
          f"ratio {tool_t / bare_t:.2f} × (the command: + spec, pre-flight, rendering)")
    print("target: ratio ≤ 1.3")
    print(f"attntrace --help    {start_up * 1000:8.1f} ms   (target ≤ 300 ms)")


if __name__ == "__main__":
    main()
