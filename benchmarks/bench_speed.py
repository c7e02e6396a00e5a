"""Benchmark: attntrace against bare numpy and PyTorch, side by side, in one run.

    python benchmarks/bench_speed.py                 # everything (several minutes)
    python benchmarks/bench_speed.py --quick         # 1k/2k, chunked 8k, fewer repeats
    python benchmarks/bench_speed.py --sizes 2048,4096 --chunked 16384 --repeat 7 --no-export

One causal attention layer, d_model 768, 12 heads, float32, inputs as float32 .npy files
(x and W_q, W_k, W_v, W_o), written to a temporary folder.  Sections:

0. **Start-up**, first (a user's start, not one on a machine busy reclaiming the memory of the
   gigabyte runs below): ``attntrace --help``, ``attntrace run`` (the built-in example) and, for
   scale, a bare ``python -c "import numpy, rich, yaml, click, ..."`` -- the imports the run
   cannot avoid -- each in a fresh interpreter, interleaved round by round.
1. **Full traces** at each ``--sizes`` (default 1k/2k/4k), the implementations interleaved
   (each round runs every one once, in a rotated order, with a 0.1 s pause between them:
   OpenBLAS threads spin for a while after a product) and the median of ``--repeat`` rounds:

   * bare numpy: load the .npy files, project, split heads, Q·Kᵀ, scale, mask, softmax in
     place, ·V, merge heads, ·W_o -- the math only;
   * ``attntrace.run(spec, dtype="float32")``: the full trace (every hook's stats, previews,
     the pattern's row sums, winners and pooled overview, the invariant checks);
   * ``attntrace run spec.yaml --dtype float32``: the command, in this process, its rendering
     written to /dev/null (spec parsing, pre-flight, the trace, the rich output);
   * torch SDPA: the same layer with ``F.scaled_dot_product_attention(is_causal=True)`` (no
     weights materialised: a speed reference, not a peer);
   * torch MHA: ``nn.MultiheadAttention(need_weights=True, average_attn_weights=False)`` with a
     causal mask -- the fair peer, since it materialises every head's weights as a tracer must.

   Ratios are against bare numpy and against torch MHA, of the medians and ("(min)") of the
   fastest rounds -- on a shared machine the two can differ; outputs are compared once.
   Then the **memory of a full trace** at the largest size: peak RSS in a fresh interpreter
   against the run's own estimate (inputs + kept arrays + the working buffer).
2. **Chunked attention** (``run(spec, chunk=N)``) at ``--chunked`` sizes (default 8k/16k), each
   in a fresh interpreter, with its peak RSS (``resource.getrusage`` maxrss, read by a small launcher
   process: a child forked straight from this one would count this process's RSS as its own).
3. **Render** of a 2k trace (the rich output to /dev/null), and the command ``attntrace run`` on a
   2k trace with and without ``--export trace.json``, alternately, each in a fresh interpreter
   (imports not timed; the last export deleted and the disk synced before each; with an
   address-space cap, ``--export-cap``, and a time limit, so a run that would not fit fails
   instead of swapping the machine).

Targets (issue 14): a full trace ≤ 1.05× bare numpy and no slower than torch MHA at 2k and 4k;
a full trace's peak RSS within 1.3× of its estimate; chunked 16k under 2 GB peak RSS;
``--help`` ≤ 0.15 s; ``run`` on the example ≤ 0.4 s; the JSON
export of a 2k trace ≤ 2× the run.  This checkout's attntrace is the one measured (it is put
first on PYTHONPATH, also for the fresh interpreters).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
    "PYTHONPATH", "").split(os.pathsep) if p]))
D_MODEL, HEADS = 768, 12
PAUSE = 0.1


# --------------------------------------------------------------------------- inputs

def write_inputs(folder: Path, seq: int, chunk: int = 0) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "x.npy", rng.normal(size=(seq, D_MODEL)).astype(np.float32))
    for name in ("w_q", "w_k", "w_v", "w_o"):
        np.save(folder / f"{name}.npy", (rng.normal(size=(D_MODEL, D_MODEL)) / np.sqrt(D_MODEL)).astype(np.float32))
    spec = folder / "spec.yaml"
    spec.write_text(
        "version: 1\nname: benchmark\nembeddings: {npy: x.npy}\nattention:\n"
        f"  heads: {HEADS}\n  W_q: {{npy: w_q.npy}}\n  W_k: {{npy: w_k.npy}}\n"
        "  W_v: {npy: w_v.npy}\n  W_o: {npy: w_o.npy}\n  mask: causal\n" +
        (f"  chunk: {chunk}\n" if chunk else ""))
    return spec


def load(folder: Path):
    return [np.load(folder / f"{n}.npy") for n in ("x", "w_q", "w_k", "w_v", "w_o")]


# --------------------------------------------------------------------------- the implementations

def bare_numpy(folder: Path) -> np.ndarray:
    x, w_q, w_k, w_v, w_o = load(folder)
    seq, d_model = x.shape
    d_head = d_model // HEADS

    def split(t):
        return t.reshape(seq, HEADS, d_head).transpose(1, 0, 2)

    q, k, v = split(x @ w_q), split(x @ w_k), split(x @ w_v)
    scores = q @ k.transpose(0, 2, 1)
    scores *= x.dtype.type(1 / np.sqrt(d_head))
    scores[:, np.triu(np.ones((seq, seq), dtype=bool), k=1)] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    z = scores @ v
    return z.transpose(1, 0, 2).reshape(seq, d_model) @ w_o


def attntrace_api(spec: Path, keep="auto"):
    import attntrace
    return attntrace.run(str(spec), dtype="float32", keep=keep)


def attntrace_command(args) -> None:
    """The real `attntrace run`, in this process, its output written to /dev/null."""
    from attntrace.cli.main import cli
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        try:
            cli.main(args=list(args), prog_name="attntrace", standalone_mode=False)
        except SystemExit as done:
            if done.code not in (0, None):
                raise RuntimeError(f"attntrace {' '.join(args)} exited with {done.code}") from None


class Torch:
    """The same layer in PyTorch, weights copied from the .npy files."""

    def __init__(self, folder: Path):
        import torch
        self.torch = torch
        torch.set_grad_enabled(False)
        x, w_q, w_k, w_v, w_o = load(folder)
        self.folder = folder
        self.w = [torch.from_numpy(w) for w in (w_q, w_k, w_v, w_o)]
        mha = torch.nn.MultiheadAttention(D_MODEL, HEADS, bias=False, batch_first=True).eval()
        mha.in_proj_weight.copy_(torch.cat([w.T for w in self.w[:3]]))
        mha.out_proj.weight.copy_(self.w[3].T)
        self.mha = mha
        seq = x.shape[0]
        self.mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)      # True = blocked

    def x(self):
        return self.torch.from_numpy(np.load(self.folder / "x.npy"))[None]

    def sdpa(self) -> np.ndarray:
        torch = self.torch
        x = self.x()
        seq = x.shape[1]
        q, k, v = ((x @ w).view(1, seq, HEADS, -1).transpose(1, 2) for w in self.w[:3])
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return (z.transpose(1, 2).reshape(1, seq, D_MODEL) @ self.w[3])[0].numpy()

    def mha_weights(self) -> np.ndarray:
        x = self.x()
        out, weights = self.mha(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=self.mask)
        assert weights.shape == (1, HEADS, x.shape[1], x.shape[1])
        return out[0].numpy()


# --------------------------------------------------------------------------- timing

def interleaved(cases, repeat: int):
    """{name: [seconds, ...]}: every case once per round, the order rotated round by round."""
    times = {name: [] for name, _ in cases}
    for _name, fn in cases:                      # warm: imports, caches, first-touch of the code paths
        fn()
        time.sleep(PAUSE)
    for r in range(repeat):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for name, fn in order:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            time.sleep(PAUSE)
    return times


def fresh_time(args) -> float:
    """Wall time of `python args...` in a fresh interpreter, output to /dev/null."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


# --------------------------------------------------------------------------- sections

def section_full(sizes, repeat: int, use_torch: bool, tmp: Path) -> None:
    print(f"\n## Full traces: causal, d_model {D_MODEL}, {HEADS} heads, float32 (median of {repeat}, interleaved)")
    for seq in sizes:
        folder = tmp / f"full{seq}"
        spec = write_inputs(folder, seq)
        cases = [("bare numpy", lambda folder=folder: bare_numpy(folder)),
                 ("attntrace.run()", lambda spec=spec: attntrace_api(spec)),
                 ("attntrace run (cmd)",
                  lambda spec=spec: attntrace_command(["run", str(spec), "--dtype", "float32"]))]
        model = None
        if use_torch:
            model = Torch(folder)
            cases += [("torch SDPA", model.sdpa), ("torch MHA weights", model.mha_weights)]
        reference = bare_numpy(folder)
        agree = {"attntrace.run()": attntrace_api(spec, keep=["hook_attn_out"])["hook_attn_out"][0]}
        if model is not None:
            agree.update({"torch SDPA": model.sdpa(), "torch MHA weights": model.mha_weights()})
        times = interleaved(cases, repeat)
        med = {name: statistics.median(t) for name, t in times.items()}
        base, peer = med["bare numpy"], med.get("torch MHA weights")
        print(f"\nseq {seq}  (load average {load_average()})")
        least = {name: min(t) for name, t in times.items()}
        print(f"  {'':22s} {'median':>11s} {'min':>11s}  {'× numpy':>8s} {'(min)':>6s}  {'× MHA':>6s} {'(min)':>6s}"
              f"  max |out − numpy|")
        for name, _ in cases:
            diff = agree.get(name)
            diff_text = "" if diff is None else f"{float(np.max(np.abs(diff - reference))):.2e}"
            vs_peer = f"{med[name] / peer:6.2f} {least[name] / least['torch MHA weights']:6.2f}" if peer else \
                "     -      -"
            print(f"  {name:22s} {ms(med[name])} {ms(least[name])}  {med[name] / base:7.2f}× "
                  f"{least[name] / least['bare numpy']:5.2f}×  {vs_peer}  {diff_text}")
        del model
    print("\n  target: attntrace.run() ≤ 1.05× bare numpy and ≤ 1.00× torch MHA at 2k and 4k")


LAUNCHER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print("PEAK", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)
sys.exit(done.returncode)
"""


def measured(code: str, *args, timeout=None):
    """Run `python -c code args` under a small launcher, so that the child's getrusage maxrss is its own (a
    child forked from this big process would start from this process's RSS); returns (completed, peak bytes)."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", code, *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK")]
    return done, (peaks[-1] if peaks else 0)


CHUNK_CODE = """
import sys, time
import attntrace
start = time.perf_counter()
trace = attntrace.run(sys.argv[1], dtype="float32", chunk=int(sys.argv[2]))
elapsed = time.perf_counter() - start
assert "attn.hook_block_max" in trace.plan.hooks and "attn.hook_pattern" not in trace.arrays
print(elapsed, trace.plan.size("seq_q"))
"""


def section_chunked(sizes, chunk: int, tmp: Path) -> None:
    print(f"\n## Chunked attention: run(spec, chunk={chunk}), float32, one fresh interpreter per size")
    print(f"  {'seq':>6s} {'run':>11s} {'peak RSS':>10s}")
    for seq in sizes:
        folder = tmp / f"chunk{seq}"
        spec = write_inputs(folder, seq)
        done, rss = measured(CHUNK_CODE, spec, chunk)
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
            print(f"  {seq:6d} failed: {why}")
            continue
        elapsed, _ = done.stdout.split()
        print(f"  {seq:6d} {ms(float(elapsed))} {rss / 2**30:8.2f} GiB")
    print("  target: 16,384 tokens under 2 GB peak RSS")


MEMORY_CODE = """
import resource, sys
import attntrace
from attntrace.core import memory
from attntrace.core.plan import plan_from_spec
spec = attntrace.load_spec(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
estimate = memory.estimate(spec, plan_from_spec(spec), "float32")
attntrace.run(spec, dtype="float32")
print(before, estimate.inputs, estimate.retained, estimate.working)
"""


def section_memory(seq: int, tmp: Path) -> None:
    """Peak RSS of a full trace (keep="auto") against the run's own estimate: inputs + kept arrays +
    the working buffer; the interpreter, numpy and the loaded spec are what was resident before."""
    print(f"\n## Memory of a full trace: {seq} tokens, float32, keep='auto', a fresh interpreter")
    done, rss = measured(MEMORY_CODE, write_inputs(tmp / f"memory{seq}", seq))
    if done.returncode != 0:
        print(f"  failed: {done.stderr.strip().splitlines()[-1:]}")
        return
    before, inputs, retained, working = (int(v) for v in done.stdout.split())
    estimate = inputs + retained + working
    grown = rss - before
    print(f"  estimate {estimate / 2**20:8.0f} MiB   (inputs {inputs / 2**20:.0f}, kept {retained / 2**20:.0f}, "
          f"working {working / 2**20:.0f})")
    print(f"  peak RSS {rss / 2**20:8.0f} MiB   ({before / 2**20:.0f} before the run, which holds the inputs: "
          f"the run added {grown / 2**20:.0f} MiB = {grown / max(estimate - inputs, 1):.2f}× kept + working)")
    print("  target: within 1.3× (inputs + retained arrays + one working buffer)")


def section_startup(repeat: int) -> None:
    # a checkout run with PYTHONDONTWRITEBYTECODE would compile every module on every start; pip
    # compiles an installed package once, at install: so do that first
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "attntrace")], check=True,
                   stdout=subprocess.DEVNULL)
    print(f"\n## Start-up (fresh interpreter each, median of {repeat}, interleaved; bytecode compiled, as pip "
          f"installs it)")
    commands = {"floor": ["-c", "import numpy, numpy.random, rich.console, rich.text, rich.panel, yaml, click"],
                "help": ["-m", "attntrace", "--help"], "run": ["-m", "attntrace", "run"]}
    times: dict = {name: [] for name in commands}
    for _ in range(repeat + 1):             # round by round, so a slow spell slows all three
        for name, args in commands.items():
            times[name].append(fresh_time(args))
    median = {name: statistics.median(values[1:]) for name, values in times.items()}

    def show(label, name, target):
        print(f"  {label:<34s}{ms(median[name])}   {target:<20s}all: "
              + " ".join(f"{t * 1000:.0f}" for t in times[name][1:]))
    show("attntrace --help", "help", "(target ≤ 150 ms)")
    show("attntrace run (built-in)", "run", "(target ≤ 400 ms)")
    show("python: numpy, rich, yaml, click", "floor", "(imports only)")
    print(f"  attntrace's own part of the built-in run: {ms(median['run'] - median['floor']).strip()} "
          f"(the run less the imports it cannot avoid)")


COMMAND_CODE = """
import resource, sys, time
cap = int(sys.argv[1])
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from attntrace.cli.main import cli
import attntrace.analysis.run, attntrace.render.trace_view, attntrace.render.export     # imports: not timed
start = time.perf_counter()
try:
    cli.main(args=sys.argv[2:], prog_name="attntrace", standalone_mode=False)
    code = 0
except SystemExit as done:
    code = done.code or 0
except MemoryError:
    code = "MemoryError"
elapsed = time.perf_counter() - start
print("RESULT", elapsed, code, file=sys.stderr)
"""


def command_time(args, cap: int, limit: float):
    """(seconds, exit code, peak RSS) of `attntrace ARGS` in a fresh interpreter, imports excluded
    (its output to /dev/null); None when it did not finish in `limit` seconds."""
    try:
        done, rss = measured(COMMAND_CODE, cap, *args, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    result = [line for line in done.stderr.splitlines() if line.startswith("RESULT")]
    if not result:
        return float("nan"), (done.stderr.strip().splitlines() or ["?"])[-1], rss
    _, elapsed, code = result[-1].split()
    return float(elapsed), code, rss


def section_render_export(seq: int, repeat: int, export: bool, cap: int, limit: float, tmp: Path) -> None:
    import attntrace
    from attntrace.render.output import make_console
    from attntrace.render.trace_view import ViewOptions, render_trace
    folder = tmp / f"render{seq}"
    spec = write_inputs(folder, seq)
    print(f"\n## Render and export of a {seq}-token trace (float32)")
    traces = []

    def trace_it():
        traces[:] = [attntrace.run(str(spec), dtype="float32")]

    def render_it():
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            render_trace(make_console(), traces[0], ViewOptions())
    trace_it()
    times = interleaved([("run", trace_it), ("render", render_it)], repeat)
    run_t, render_t = statistics.median(times["run"]), statistics.median(times["render"])
    print(f"  attntrace.run()                    {ms(run_t)}")
    print(f"  render (rich, to /dev/null)        {ms(render_t)}   {render_t / run_t:.2f}× the run")
    if not export:
        return
    # the command with and without --export, alternately, each in a fresh interpreter (imports not timed);
    # before each, the last export is deleted and os.sync() lets the disk finish writing it, so every
    # export pays for its own bytes, not for the write-back of the one before
    target, beside = folder / "trace.json", folder / "trace.npz"
    plain = ["run", str(spec), "--dtype", "float32"]
    results: dict = {"plain": [], "export": []}
    written = 0
    for _ in range(repeat):
        for name, args in (("plain", plain), ("export", plain + ["--export", str(target)])):
            for old in (target, beside):
                if old.exists():
                    old.unlink()
            os.sync()
            time.sleep(PAUSE)
            outcome = command_time(args, cap, limit)
            if outcome is None:
                print(f"  attntrace {' '.join(args[2:])}: did not finish in {limit:.0f} s (stopped)")
                return
            if outcome[1] != "0":
                print(f"  attntrace {name}: FAILED ({outcome[1]}; address space capped at {cap / 2**30:.0f} GiB)")
                return
            results[name].append(outcome)
            if name == "export":
                written = sum(f.stat().st_size for f in (target, beside) if f.exists())
    plain_t = statistics.median(r[0] for r in results["plain"])
    export_t = statistics.median(r[0] for r in results["export"])
    plain_rss = max(r[2] for r in results["plain"])
    export_rss = max(r[2] for r in results["export"])
    print(f"  attntrace run (cmd)                {ms(plain_t)}   peak RSS {plain_rss / 2**30:.2f} GiB"
          f"   (fresh interpreter, imports not timed, median of {len(results['plain'])})")
    print(f"  attntrace run --export trace.json  {ms(export_t)}   peak RSS {export_rss / 2**30:.2f} GiB, "
          f"{written / 2**20:.0f} MiB written (trace.json + trace.npz)")
    print(f"  the export costs {export_t / plain_t:.2f}× the command without it "
          f"({(export_t - plain_t) / run_t:.1f}× attntrace.run() on top)")
    print("  target: the JSON export of a 2k trace ≤ 2× the run")


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,2048,4096", help="full-trace sizes (comma-separated)")
    parser.add_argument("--chunked", default="8192,16384", help="chunked sizes ('' for none)")
    parser.add_argument("--chunk", type=int, default=512, help="key block of the chunked runs")
    parser.add_argument("--repeat", type=int, default=7, help="rounds of the interleaved timings")
    parser.add_argument("--startup-repeat", type=int, default=9)
    parser.add_argument("--render-seq", type=int, default=2048)
    parser.add_argument("--no-torch", action="store_true", help="leave torch out even when installed")
    parser.add_argument("--no-export", action="store_true", help="skip the JSON export")
    parser.add_argument("--export-cap", type=float, default=6.0, help="GiB of address space the export may use")
    parser.add_argument("--export-limit", type=float, default=120.0, help="seconds the export may take")
    parser.add_argument("--quick", action="store_true", help="1k/2k, chunked 8k, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.chunked, args.repeat, args.startup_repeat = "1024,2048", "8192", 3, 3
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    chunked = [int(s) for s in args.chunked.split(",") if s.strip()]
    use_torch = not args.no_torch and importlib.util.find_spec("torch") is not None

    import attntrace
    blas = ""
    try:
        from threadpoolctl import threadpool_info
        blas = ", ".join(f"{i['internal_api']} {i.get('version') or ''} ×{i['num_threads']}"
                         for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        pass
    torch_text = "not installed" if not use_torch else __import__("torch").__version__
    print(f"# bench_speed: attntrace {getattr(attntrace, '__version__', '?')} from {Path(attntrace.__file__).parent}")
    print(f"python {platform.python_version()}, numpy {np.__version__} ({blas or 'BLAS ?'}), torch {torch_text}, "
          f"{os.cpu_count()} CPUs, load average {load_average()}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        section_startup(args.startup_repeat)    # first: a user's start, not one after the gigabyte runs below
        if sizes:
            section_full(sizes, args.repeat, use_torch, tmp)
        if sizes:
            section_memory(max(sizes), tmp)
        if chunked:
            section_chunked(chunked, args.chunk, tmp)
        if args.render_seq:
            section_render_export(args.render_seq, max(3, args.repeat // 2), not args.no_export,
                                  int(args.export_cap * 2**30), args.export_limit, tmp)
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
