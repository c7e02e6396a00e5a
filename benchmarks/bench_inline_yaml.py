"""Benchmark: a matrix written inline in the YAML against PyYAML and a .npy sidecar.

    python benchmarks/bench_inline_yaml.py [--rows 512] [--cols 768] [--repeat 5]

Writes one spec whose embeddings are a rows × cols matrix written inline, and the
same matrix as a .npy file, then times, interleaved in one process:

* PyYAML's CSafeLoader (libyaml) on the spec text -- the floor for inline YAML;
* attntrace.load_spec(spec) -- the same parse plus attntrace's own checks (the
  alias budget, duplicate keys, number guards, the shape of every nested list);
* numpy.load of the .npy sidecar.

Target (issue 14): attntrace ≤ 1.10 × CSafeLoader.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def write_spec(folder: Path, rows: int, cols: int) -> Path:
    matrix = np.random.default_rng(0).normal(size=(rows, cols)).round(6)
    np.save(folder / "x.npy", matrix)
    lines = ["version: 1", "embeddings:"]
    lines += ["  - [" + ", ".join(repr(float(v)) for v in row) + "]" for row in matrix]
    lines += ["attention:", "  heads: 1"] + [f"  {w}: {{identity: {cols}}}" for w in ("W_q", "W_k", "W_v")]
    spec = folder / "inline.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=768)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from attntrace import load_spec
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with tempfile.TemporaryDirectory() as tmp:
        spec = write_spec(Path(tmp), args.rows, args.cols)
        text = spec.read_text()
        mib = spec.stat().st_size / 2 ** 20
        runs = {
            f"PyYAML {loader.__name__}": lambda: yaml.load(text, Loader=loader),
            "attntrace.load_spec": lambda: load_spec(spec),
            "numpy.load (.npy sidecar)": lambda: np.load(Path(tmp) / "x.npy", allow_pickle=False),
        }
        times = {name: [] for name in runs}
        for _ in range(args.repeat):
            for name, run in runs.items():          # interleaved: a busy machine slows all of them alike
                gc.collect()
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
                time.sleep(0.1)
    floor = statistics.median(times[f"PyYAML {loader.__name__}"])
    print(f"{args.rows}×{args.cols} inline matrix ({mib:.1f} MiB of YAML), "
          f"median of {args.repeat}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median * 1000:10.1f} ms   {median / floor:8.3f} × {loader.__name__}")


if __name__ == "__main__":
    main()
