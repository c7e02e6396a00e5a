"""A fuzzer for attntrace: generated and mutated specs, sidecar array files, hook strings and CLI flags.

Each *case* is a folder with a spec (a generated valid spec, then a few mutations
of its YAML text) and the sidecar files the mutations wrote, run through a few
*invocations* (CLI commands in-process, and the Python API).  Every invocation
must end cleanly, whatever the input:

    * an exit code in {0, 1, 2, 3}, never ATT-E999 (exit 70) and never a traceback;
    * within HANG_SECONDS of CPU time (CPU, not wall-clock time: the machine may be busy with
      other work; an alarm after ALARM_SECONDS of wall-clock time stops a call that waits);
    * no numpy RuntimeWarning (what ``python -W error`` would turn into a crash);
    * under ``--format json``, exactly one JSON document on stdout;
    * no input file changed (the spec and its sidecars);
    * the API raises only attntrace's own exceptions, and a trace that holds NaN/inf
      never lists a value check as passed (no false ✓).

Everything is drawn from small registries, so new inputs (model configs, captures,
block specs) are a decorated function away:

    SPECS       name -> fn(rng) -> a valid spec dict                 @spec_generator
    MUTATIONS   name -> fn(rng, text, case) -> mutated YAML text    @mutation
    SIDECARS    name -> fn(rng, case, shape) -> source mapping text  @sidecar
    COMMANDS    name -> fn(rng, case) -> (argv, stdin text)          @command
    HOOK_NAMES, HOOK_ACTIONS, HOOK_ARGUMENTS, INTERESTING_NUMBERS    plain lists

A case is reproducible from its seed: ``Fuzzer(seed).case(i)``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import re
import signal
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import yaml

HANG_SECONDS = 5.0
ALARM_SECONDS = 30                 # a call still running after this is stopped (and counted as a hang)
EXIT_CODES = {0, 1, 2, 3}
# what each check that verifies values reads: it may not pass while one of these holds NaN/inf
VALUE_CHECKS = {"every row of weights sums to 1": ("attn.hook_pattern",),
                "masked positions get exactly zero weight": ("attn.hook_pattern",),
                "scores are scaled by the planned factor": ("attn.hook_qk", "attn.hook_scaled"),
                "no NaN or inf in any step": ("",)}

INTERESTING_NUMBERS = ["0", "-1", "1", "2", "3", "7", "0.5", "-0.0", "1e-320", "1.0e+308", "-1.0e+308", "1e400",
                       ".nan", ".inf", "-.inf", str(2 ** 63), str(10 ** 12), "9" * 401, "9" * 5000, "0x1F",
                       "1_000", "0o17", "1:30", "true", "null", "[]", "{}", "'3'", "abc", "~", "[1, [2]]"]
HOOK_NAMES = ["Q", "K", "V", "scores", "weights", "pattern", "z", "out", "attn.hook_q", "attn.hook_scaled",
              "attn.hook_pattern", "attn.hook_z", "hook_embed", "attn.hook_mask", "attn.*", "blocks.0.attn.hook_q",
              "blocks.1.attn.hook_pattern", "hook_resid_post", "mlp.hook_pre", "nonsense", "", "*"]
HOOK_ACTIONS = ["print", "save", "zero", "ablate-head", "patch", "scale", "clamp", "ablate", "bogus", ""]
HOOK_ARGUMENTS = ["", "0", "1", "-1", "0,1", "99", "1e308", "-1e308", "nan", "inf", "1.5", ",", "-5,5", ",10",
                  "5,-5", "9" * 5000, "x.npz", "p.npy", "p.npz", "p.npz:attn.hook_q", "/no/such/dir/s.npz",
                  "spec.yaml", "s.npz", "../s.npz", "a,b"]
BUG_NAMES = ["forgot-transpose-k", "softmax-wrong-axis", "scale-by-d-model", "mask-after-softmax", "nonsense"]
SELECTIONS = ["0", "1", "99", "-1", "all", "0-3", "0-99999999999", "1,2,3", "", "x", "0-", "3-1"]
STEPS = ["q,k", "weights", "nonsense", "1", "99", "attn.hook_*", "", "0", "scores,7"]


# --------------------------------------------------------------------------- registries

SPECS: Dict[str, Callable[[random.Random], dict]] = {}
MUTATIONS: Dict[str, Callable[[random.Random, str, Case], str]] = {}
SIDECARS: Dict[str, Callable[[random.Random, Case, Tuple[int, ...]], str]] = {}
COMMANDS: Dict[str, Callable[[random.Random, Case], Tuple[List[str], str]]] = {}


def _register(table: dict, name: str):
    def add(fn):
        table[name] = fn
        return fn
    return add


def spec_generator(name: str):
    return _register(SPECS, name)


def mutation(name: str):
    return _register(MUTATIONS, name)


def sidecar(name: str):
    return _register(SIDECARS, name)


def command(name: str):
    return _register(COMMANDS, name)


# --------------------------------------------------------------------------- valid specs

def _matrix(rng: random.Random, rows: int, cols: int, scale: float = 1.0) -> List[List[float]]:
    return [[round(rng.gauss(0.0, scale), 3) for _ in range(cols)] for _ in range(rows)]


def _vector(rng: random.Random, n: int, scale: float = 0.3) -> List[float]:
    return [round(rng.gauss(0.0, scale), 3) for _ in range(n)]


@dataclass
class Sizes:
    batch: int
    seq: int
    d_model: int
    heads: int
    kv_heads: int
    d_head: int

    @classmethod
    def draw(cls, rng: random.Random, even_d_head: bool = False) -> Sizes:
        heads = rng.choice([1, 2, 3, 4])
        kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
        d_head = rng.choice([2, 4] if even_d_head else [1, 2, 3, 4])
        return cls(batch=rng.choice([1, 1, 2]), seq=rng.randint(1, 6), d_model=rng.randint(1, 8),
                   heads=heads, kv_heads=kv_heads, d_head=d_head)


def _embeddings(rng: random.Random, sizes: Sizes, seq: Optional[int] = None):
    seq = seq or sizes.seq
    rows = [_matrix(rng, seq, sizes.d_model) for _ in range(sizes.batch)]
    return rows[0] if sizes.batch == 1 else rows


def _mask(rng: random.Random, sizes: Sizes, seq_k: int):
    kind = rng.choice(["none", "causal", "padding", "window", "prefix", "matrix", "combined"])
    if kind == "none":
        return None
    if kind == "causal":
        return "causal"
    if kind == "padding":
        rows = [[1] + [rng.choice([0, 1]) for _ in range(seq_k - 1)] for _ in range(sizes.batch)]
        return {"padding": rows[0] if sizes.batch == 1 else rows}
    if kind == "window":
        return {"causal": rng.choice([True, False]), "window": rng.randint(1, 4)}
    if kind == "prefix":
        return {"causal": True, "prefix": rng.randint(1, 3)}
    if kind == "matrix":
        return [[1 if j == 0 or rng.random() < 0.6 else 0 for j in range(seq_k)] for _ in range(sizes.seq)]
    return {"causal": True, "padding": [1] * seq_k, "window": rng.randint(1, 3)}


def attention_block(rng: random.Random, sizes: Sizes, seq_k: int, biases: Optional[bool] = None,
                    w_o: Optional[bool] = None) -> dict:
    """One attention mapping with random weights in a random layout."""
    layout = rng.choice(["x_at_w", "linear"])
    width_q, width_kv = sizes.heads * sizes.d_head, sizes.kv_heads * sizes.d_head

    def weight(d_in, d_out, scale=0.7):
        w = _matrix(rng, d_in, d_out, scale)
        return w if layout == "x_at_w" else [list(col) for col in zip(*w)]
    block = {"heads": sizes.heads, "layout": layout, "W_q": weight(sizes.d_model, width_q),
             "W_k": weight(sizes.d_model, width_kv), "W_v": weight(sizes.d_model, width_kv)}
    if sizes.kv_heads != sizes.heads:
        block["kv_heads"] = sizes.kv_heads
    if biases if biases is not None else rng.random() < 0.4:
        block.update(b_q=_vector(rng, width_q), b_k=_vector(rng, width_kv), b_v=_vector(rng, width_kv))
    if w_o if w_o is not None else rng.random() < 0.6:
        block["W_o"] = weight(width_q, sizes.d_model)
        if rng.random() < 0.4:
            block["b_o"] = _vector(rng, sizes.d_model)
    scale = rng.choice(["auto", "auto", "none", 0.5, 2.0])
    if scale != "auto":
        block["scale"] = scale
    mask = _mask(rng, sizes, seq_k)
    if mask is not None:
        block["mask"] = mask
    return block


@spec_generator("attention")
def single_attention(rng: random.Random) -> dict:
    positional = rng.choice([None, None, "sinusoidal", "alibi", "rope"])
    sizes = Sizes.draw(rng, even_d_head=positional == "rope")
    spec = {"version": 1, "name": "fuzz", "tokens": [f"t{i}" for i in range(sizes.seq)],
            "embeddings": _embeddings(rng, sizes), "attention": attention_block(rng, sizes, sizes.seq)}
    if positional:
        spec["positional"] = positional
    return spec


@spec_generator("cross")
def cross_attention(rng: random.Random) -> dict:
    sizes = Sizes.draw(rng)
    seq_k = rng.randint(1, 6)
    spec = {"version": 1, "tokens": [f"q{i}" for i in range(sizes.seq)], "embeddings": _embeddings(rng, sizes),
            "encoder": {"tokens": [f"k{i}" for i in range(seq_k)], "embeddings": _embeddings(rng, sizes, seq_k)},
            "attention": attention_block(rng, sizes, seq_k)}
    mask = spec["attention"].get("mask")
    if mask == "causal" or isinstance(mask, dict) and (mask.get("causal") or mask.get("window")):
        del spec["attention"]["mask"]          # cross-attention masks are padding or explicit
    return spec


@spec_generator("blocks")
def transformer_blocks(rng: random.Random) -> dict:
    sizes = Sizes.draw(rng)
    sizes.d_model = sizes.heads * sizes.d_head                   # residual adds need out == d_model
    d_mlp = rng.randint(1, 8)
    blocks = []
    for _ in range(rng.randint(1, 2)):
        block = {"attention": attention_block(rng, sizes, sizes.seq, w_o=True)}
        block["attention"]["layout"] = "x_at_w"
        width = sizes.heads * sizes.d_head
        block["attention"].update(W_q=_matrix(rng, sizes.d_model, width, 0.5),
                                  W_k=_matrix(rng, sizes.d_model, sizes.kv_heads * sizes.d_head, 0.5),
                                  W_v=_matrix(rng, sizes.d_model, sizes.kv_heads * sizes.d_head, 0.5),
                                  W_o=_matrix(rng, width, sizes.d_model, 0.5))
        for key in ("b_q", "b_k", "b_v", "b_o"):
            block["attention"].pop(key, None)
        if rng.random() < 0.7:
            block["norm"] = {"kind": rng.choice(["layernorm", "rmsnorm"]), "placement": rng.choice(["pre", "post"])}
        if rng.random() < 0.7:
            gated = rng.random() < 0.4
            names = ("W_gate", "W_up", "W_down") if gated else ("W_in", "W_out")
            block["mlp"] = {name: _matrix(rng, d_mlp, sizes.d_model, 0.5) if name in ("W_down", "W_out")
                            else _matrix(rng, sizes.d_model, d_mlp, 0.5) for name in names}
            block["mlp"]["activation"] = rng.choice(["gelu", "relu", "silu", "gelu_tanh"])
        blocks.append(block)
    return {"version": 1, "tokens": [f"t{i}" for i in range(sizes.seq)], "embeddings": _embeddings(rng, sizes),
            "blocks": blocks}


CONFIG_FOLDER = Path(__file__).resolve().parent.parent / "configs"
CONFIG_MAX_FLOPS = 1e9      # a case runs in well under a second; configs/long_causal_2k.yaml (6e9) would not


@functools.cache
def small_configs() -> Tuple[Path, ...]:
    """The shipped configs that are small to write and to run: a few lines of YAML can describe a
    2,048-token layer, and run(check="all") on it takes longer than a case may."""
    import attntrace
    from attntrace.core.plan import plan_from_spec
    small = []
    for path in sorted(CONFIG_FOLDER.glob("*.yaml")):
        if path.stat().st_size >= 4000:
            continue
        try:
            plan = plan_from_spec(attntrace.load_spec(str(path)))
            work = max((plan.flops(step) for step in plan.steps), default=0)
        except attntrace.AttnTraceError:            # a config that is bad on purpose is a fine seed
            work = 0
        if work < CONFIG_MAX_FLOPS:
            small.append(path)
    return tuple(small)


@spec_generator("config")
def shipped_config(rng: random.Random) -> dict:
    """A config shipped with attntrace (small ones), as data: sidecar-free seeds for mutation."""
    return yaml.safe_load(rng.choice(small_configs()).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- sidecar files

class Case:
    """One fuzz case: its folder, spec text, sidecar files and what ran."""

    def __init__(self, folder: Path, seed: int, rng: random.Random):
        self.folder, self.seed, self.rng = folder, seed, rng
        self.spec_path = folder / "spec.yaml"
        self.files: List[Path] = []
        self.generator = ""
        self.mutations: List[str] = []
        self.text = ""

    def file(self, name: str) -> Path:
        path = self.folder / f"{len(self.files)}_{name}"
        self.files.append(path)
        return path

    def fingerprint(self) -> Dict[str, Optional[str]]:
        """A hash of every input file: nothing may write over them."""
        found = {}
        for path in [self.spec_path] + self.files:
            try:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            except OSError:
                found[str(path)] = None
        return found


def _array(rng: random.Random, shape: Tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(rng.randrange(1 << 30)).normal(size=shape)


def _other_shape(rng: random.Random, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Mostly the shape the spec wants (so runs go deep), sometimes another."""
    grown = (shape[0] + 1,) + shape[1:] if shape else (2,)
    return rng.choice([shape, shape, shape[::-1], grown, (), (2, 2, 2, 2, 2), (0, 3)])


def _npy(rng, case, shape, dtype=np.float64, name="x.npy", **kw) -> str:
    path = case.file(name)
    np.save(path, _array(rng, _other_shape(rng, shape)).astype(dtype), **kw)
    return f"{{npy: {path.name}}}"


@sidecar("npy")
def npy_valid(rng, case, shape):
    return _npy(rng, case, shape)


@sidecar("npy-dtypes")
def npy_dtypes(rng, case, shape):
    dtype = rng.choice([np.float32, np.float16, np.int64, np.uint8, np.bool_, np.complex128, ">f8", "<U3",
                        np.longdouble])
    path = case.file("d.npy")
    np.save(path, _array(rng, shape).astype(dtype))
    return f"{{npy: {path.name}}}"


@sidecar("npy-fortran")
def npy_fortran(rng, case, shape):
    path = case.file("f.npy")
    np.save(path, np.asfortranarray(_array(rng, shape)))
    return f"{{npy: {path.name}}}"


@sidecar("npy-nonfinite")
def npy_nonfinite(rng, case, shape):
    array = _array(rng, shape or (1,))
    if array.size:
        array.reshape(-1)[0] = rng.choice([np.nan, np.inf, -np.inf, 1e308])
    path = case.file("n.npy")
    np.save(path, array)
    return f"{{npy: {path.name}}}"


@sidecar("npy-cut")
def npy_truncated(rng, case, shape):
    path = case.file("t.npy")
    np.save(path, _array(rng, shape))
    raw = path.read_bytes()
    path.write_bytes(raw[:rng.randrange(len(raw))])
    return f"{{npy: {path.name}}}"


@sidecar("npy-garbage")
def npy_garbage(rng, case, shape):
    header = rng.choice(["{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2)",
                         "{'descr': 'O', 'fortran_order': False, 'shape': (2,), }",
                         "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999,), }",
                         "{'descr': '<f8', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }",
                         "[" * 3000, "{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (2,), }",
                         "\x00\xff\xfe"]).encode("latin1")
    version = rng.choice([b"\x01\x00", b"\x02\x00", b"\x09\x09"])
    length = len(header).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    path = case.file("g.npy")
    path.write_bytes(b"\x93NUMPY" + version + length + header + b"\0" * rng.randrange(64))
    return f"{{npy: {path.name}}}"


@sidecar("npy-pickle")
def npy_pickle(rng, case, shape):
    path = case.file("o.npy")
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return f"{{npy: {path.name}}}"


@sidecar("npz")
def npz_valid(rng, case, shape):
    path = case.file("a.npz")
    save = np.savez_compressed if rng.random() < 0.5 else np.savez
    save(path, w=_array(rng, _other_shape(rng, shape)), other=np.ones(2))
    return f"{{npz: {path.name}, key: {rng.choice(['w', 'w', 'other', 'missing', 'w.npy'])}}}"


@sidecar("npz-broken")
def npz_broken(rng, case, shape):
    path = case.file("b.npz")
    kind = rng.choice(["empty", "empty-archive", "npy-inside", "cut", "text"])
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "empty-archive":
        path.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    elif kind == "npy-inside":
        np.save(path.with_suffix(".npy"), _array(rng, shape))
        path.with_suffix(".npy").rename(path)
    elif kind == "cut":
        np.savez(path, w=_array(rng, shape))
        raw = path.read_bytes()
        path.write_bytes(raw[:rng.randrange(len(raw))])
    else:
        path.write_text("not an archive")
    return f"{{npz: {path.name}, key: w}}"


@sidecar("safetensors")
def safetensors_file(rng, case, shape):
    from attntrace.inputs.safetensors_io import safetensors_bytes
    path = case.file("s.safetensors")
    raw = b"".join(safetensors_bytes({"w": _array(rng, _other_shape(rng, shape) or (1,)).astype(np.float32)}))
    kind = rng.choice(["valid", "valid", "cut", "header", "empty"])
    if kind == "cut":
        raw = raw[:rng.randrange(len(raw))]
    elif kind == "header":
        raw = (len(b"{not json").to_bytes(8, "little") + b"{not json")
    elif kind == "empty":
        raw = b""
    path.write_bytes(raw)
    return f"{{safetensors: {path.name}, key: {rng.choice(['w', 'w', 'nope'])}}}"


@sidecar("random")
def random_source(rng, case, shape):
    params = {"shape": list(_other_shape(rng, shape)) or [1], "seed": rng.randrange(100)}
    for key in ("std", "mean", "seed", "shape"):
        if rng.random() < 0.25:
            params[key] = yaml.safe_load(rng.choice(INTERESTING_NUMBERS[:17]))
    return "{random: " + json.dumps(params) + "}"


@sidecar("identity")
def identity_source(rng, case, shape):
    return f"{{identity: {rng.choice([shape[0] if shape else 1, 1, 0, -1, 10 ** 6, 'x'])}}}"


@sidecar("not-a-file")
def not_a_file(rng, case, shape):
    choice = rng.choice(["missing.npy", "/proc/self/mem", "/dev/zero", ".", "/", "", "\u0000x.npy", "a" * 5000])
    kind = rng.choice(["npy", "npz"])
    return f"{{{kind}: {json.dumps(choice)}" + (", key: w}" if kind == "npz" else "}")


# --------------------------------------------------------------------------- text mutations

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])")
MATRIX = re.compile(r"\[\[[^\[\]]*\](?:,\s*\[[^\[\]]*\])*\]")
KEYS = ["version", "tokens", "embeddings", "attention", "heads", "kv_heads", "d_head", "W_q", "W_k", "W_v",
        "W_o", "b_q", "b_o", "scale", "mask", "causal", "padding", "window", "prefix", "matrix", "convention",
        "positional", "kind", "base", "layout", "blocks", "norm", "mlp", "ln1", "expect", "hooks", "grad",
        "encoder", "model", "text", "tolerance", "atol", "loss", "upstream", "placement", "eps", "Wq", "attn"]


@mutation("number")
def replace_number(rng, text, case):
    numbers = list(NUMBER.finditer(text))
    if not numbers:
        return text
    match = rng.choice(numbers)
    return text[:match.start()] + rng.choice(INTERESTING_NUMBERS) + text[match.end():]


@mutation("line")
def line_edit(rng, text, case):
    lines = text.splitlines()
    if not lines:
        return text
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    action = rng.choice(["delete", "duplicate", "swap", "indent", "dedent"])
    if action == "delete":
        del lines[i]
    elif action == "duplicate":
        lines.insert(i, lines[i])
    elif action == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif action == "indent":
        lines[i] = "  " + lines[i]
    else:
        lines[i] = lines[i].lstrip()
    return "\n".join(lines) + "\n"


@mutation("bytes")
def insert_characters(rng, text, case):
    at = rng.randrange(len(text) + 1)
    junk = rng.choice([":", "[", "]", "{", "}", "&a", "*a", "!", "\t", "- ", "#", "'", '"', "\\", "%", "@",
                       "é", "\u2028", "｛", "\x00", "\ufeff", "---\n", "...\n", ": :", "? "])
    return text[:at] + junk + text[at:]


TYPED_VALUES = ["[1, [2]]", "{a: 1}", "5", "null", "true", "-1.5", "text", "[]", "{}", "''", "[a, b]",
                "{npy: x.npy}", "[[1, 2], [3, 4]]", "0"]


@mutation("type")
def replace_value_type(rng, text, case):
    """A key's value becomes a value of another type (a list where a word goes, a mapping for a number)."""
    values = list(re.finditer(r"^(\s*-?\s*[A-Za-z_]+:)[ ]*(\S.*)?$", text, re.M))
    if not values:
        return text
    match = rng.choice(values)
    return text[:match.start()] + match.group(1) + " " + rng.choice(TYPED_VALUES) + text[match.end():]


@mutation("truncate")
def truncate(rng, text, case):
    return text[:rng.randrange(len(text) + 1)]


@mutation("key")
def replace_key(rng, text, case):
    keys = list(re.finditer(r"^(\s*-?\s*)([A-Za-z_]+):", text, re.M))
    if not keys:
        return text
    match = rng.choice(keys)
    return text[:match.start(2)] + rng.choice(KEYS) + text[match.end(2):]


@mutation("alias")
def add_aliases(rng, text, case):
    kind = rng.choice(["self", "bomb", "small-bomb", "repeat", "deep", "merge"])
    if kind == "self":
        extra = "description: &s [a, *s]\n" if rng.random() < 0.5 else "tokens: &t [A, *t]\n"
    elif kind in ("bomb", "small-bomb"):
        levels = 9 if kind == "bomb" else 3
        extra = "description:\n  - &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, levels))
    elif kind == "repeat":
        extra = "name: &n fuzz\ndescription: *n\n"
    elif kind == "deep":
        depth = rng.choice([30, 70, 900])
        extra = "description: " + "[" * depth + "]" * depth + "\n"
    else:
        extra = "base: &b {heads: 1}\nattention: {<<: *b}\n"
    return text + extra


@mutation("tag")
def add_tag(rng, text, case):
    tag = rng.choice(["!!python/object/apply:os.system [echo hi]", "!!binary aGk=", "!!set {a, b}",
                      "!!float abc", "!!int 1.5", "!custom x", "!!timestamp 2001-12-14", "!!omap [a: 1]"])
    return text + f"description: {tag}\n"


@mutation("source")
def replace_matrix_by_file(rng, text, case):
    """An inline matrix becomes a sidecar file (valid or broken, of its shape or another)."""
    matrices = list(MATRIX.finditer(text))
    if not matrices:
        return text
    match = rng.choice(matrices)
    try:
        shape = np.array(yaml.safe_load(match.group(0)), dtype=float).shape
    except (ValueError, TypeError, yaml.YAMLError):
        shape = (2, 2)
    name = rng.choice(sorted(SIDECARS))
    return text[:match.start()] + SIDECARS[name](rng, case, tuple(shape)) + text[match.end():]


def hook_text(rng: random.Random) -> str:
    text = f"{rng.choice(HOOK_NAMES)}:{rng.choice(HOOK_ACTIONS)}"
    argument = rng.choice(HOOK_ARGUMENTS)
    return text + (f"={argument}" if argument and rng.random() < 0.8 else "")


@mutation("hooks")
def add_hooks(rng, text, case):
    items = [json.dumps(hook_text(rng)) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        items.append("{hook: " + rng.choice(HOOK_NAMES[:8]) + ", " + rng.choice(HOOK_ACTIONS) + ": "
                     + rng.choice(INTERESTING_NUMBERS) + "}")
    for name in ("p.npy", "p.npz"):
        if any(name in item for item in items):       # the file a patch reads (a save may name it too)
            saver = np.save if name.endswith(".npy") else (lambda p, a: np.savez(p, **{"attn.hook_q": a}))
            saver(case.folder / name, _array(rng, rng.choice([(1, 3, 1, 2), (3, 2), (2,)])))
            if any(f"patch={name}" in item for item in items):
                case.files.append(case.folder / name)      # an input: nothing may write over it
    return text + "hooks: [" + ", ".join(items) + "]\n"


@mutation("expect")
def add_expectations(rng, text, case):
    hook = rng.choice(["weights", "scores", "out", "Q", "nonsense", "attn.hook_pattern"])
    value = rng.choice(["0.5", "[[1, 0], [0, 1]]", ".nan", "1e308", "abc", "[]", "{cell: [0, 0], value: 1}"])
    tolerance = rng.choice(["", "  atol: 0.1\n", "  rtol: .nan\n", "  decimals: -1\n", "  atol: 1e400\n",
                            "  decimals: 99999\n", "  tolerance: {x: 1}\n"])
    return text + f"expect:\n{tolerance}  {hook}: {value}\n"


@mutation("section")
def replace_section(rng, text, case):
    """A top-level section replaced by another valid-looking or broken value."""
    replacement = rng.choice([
        "positional: {kind: sinusoidal, base: .inf}", "positional: {kind: rope, base: 1}",
        "positional: {kind: learned, table: [[0, 1]]}", "positional: alibi", "positional: rope",
        "positional: {kind: learned, table: {random: {shape: [2, 2]}}, token_types: {table: [[1, 1]], ids: [5]}}",
        "grad: {loss: upstream, upstream: [[1, 2]]}", "grad: {loss: nonsense}", "model: ./nowhere\ntext: hi",
        "encoder: {embeddings: [[1, 2]]}", "version: 99", "version: 1.5", "name: [1]", "mask: causal",
        "blocks: []", "blocks: [{attention: {heads: 1, W_q: [[1]], W_k: [[1]], W_v: [[1]]}, norm: {eps: 0}}]",
        "embed_norm: {kind: rmsnorm, eps: 2}", "ln_final: {kind: layernorm}", "tokens: ''", "tokens: [[a]]",
        "embeddings: {}", "hooks: 5", "hooks: 'weights:print'", "expect: 3", "grad: []",
        "attention: {heads: 1, W_q: [[1]], W_k: [[1]], W_v: [[1]], mask: {padding: [0]}}"])
    key = replacement.split(":", 1)[0]
    kept = [line for line in text.splitlines() if not line.startswith(key + ":")] if rng.random() < 0.5 else \
        text.splitlines()
    return "\n".join(kept) + "\n" + replacement + "\n"


# --------------------------------------------------------------------------- commands

def _flags(rng: random.Random, case: Case, count: int) -> List[str]:
    choices = [
        lambda: ["--strict"], lambda: ["--check", "all"], lambda: ["--format", "json"],
        lambda: ["--steps", rng.choice(STEPS)], lambda: ["--head", rng.choice(SELECTIONS)],
        lambda: ["--batch", rng.choice(["0", "1", "5", "-1", "x"])],
        lambda: ["--precision", rng.choice(["0", "3", "12", "13", "-1"])],
        lambda: ["--width", rng.choice(["40", "80", "39", "100000", "x"])], lambda: ["--heatmap"],
        lambda: ["--values"], lambda: ["--dtype", rng.choice(["float32", "float64", "float16"])],
        lambda: ["--inject", rng.choice(BUG_NAMES)], lambda: ["--hook", hook_text(rng)],
        lambda: ["--export", str(case.folder / rng.choice(["t.svg", "t.npz", "t.json", "t.txt", "t.html", "t.png",
                                                           "spec.yaml", "no/t.svg", ".",
                                                           "a.json", "p.json"]))],     # beside: an input .npz
    ]
    argv: List[str] = []
    for _ in range(count):
        argv += rng.choice(choices)()
    return argv


@command("run")
def run_command(rng, case):
    return ["run", str(case.spec_path)] + _flags(rng, case, rng.randint(0, 3)), ""


@command("run-json")
def run_json_command(rng, case):
    return ["run", str(case.spec_path), "--format", "json", "--check", rng.choice(["default", "all"])] + \
        _flags(rng, case, rng.randint(0, 1)), ""


@command("step")
def step_command(rng, case):
    return ["run", str(case.spec_path), "--step"], rng.choice(["", "n\nn\nshow Q\nstats\nc\n", "q\n", "bogus\n"])


@command("explain-shapes")
def explain_command(rng, case):
    return ["explain-shapes", str(case.spec_path)] + rng.choice([[], ["--format", "json"], ["--seq", "3"]]), ""


@command("hooks")
def hooks_command(rng, case):
    return ["hooks", str(case.spec_path)] + rng.choice([[], ["--format", "json"]]), ""


@command("check")
def check_command(rng, case):
    return ["check", str(case.spec_path)] + rng.choice([[], ["--format", "json"]]), ""


@command("grad")
def grad_command(rng, case):
    return ["grad", str(case.spec_path), "--cells", rng.choice(["1", "2"])] + rng.choice(
        [[], ["--format", "json"], ["--loss", "sum_squares"], ["--tolerance", rng.choice(["nan", "1e-3", "-1"])],
         ["--grads", rng.choice(["V,weights", "nonsense", "W_*"])]]), ""


@command("diff")
def diff_command(rng, case):
    other = rng.choice([str(case.spec_path), str(case.folder / "t.npz"), str(case.folder / "t.json")])
    return ["diff", str(case.spec_path), other] + rng.choice(
        [[], ["--format", "json"], ["--rtol", rng.choice(["nan", "0", "1e-3", "inf"])],
         ["--hook-b", hook_text(rng)]]), ""


@command("mask")
def mask_command(rng, case):
    return ["mask"] + rng.choice([["--causal"], ["--seq", rng.choice(["1", "0", "5", "100000"])],
                                  ["--padding", rng.choice(["1,1,0", "2", "1,1;1", ""])],
                                  ["--window", rng.choice(["0", "2", "-1"])], ["--format", "json"]]), ""


@command("positions")
def positions_command(rng, case):
    return ["positions", "--kind", rng.choice(["sinusoidal", "rope", "alibi", "learned"]),
            "--base", rng.choice(["10000", "nan", "inf", "1", "1e308", "-5"]),
            "--seq", rng.choice(["1", "50", "4096", "4097"])] + rng.choice([[], ["--format", "json"]]), ""


# --------------------------------------------------------------------------- running and judging

class Hang(BaseException):
    """Raised by the alarm: not an Exception, so attntrace's error handling cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    def alarm(signum, frame):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kind: str                      # the command name, or "api"
    argv: List[str]
    exit_code: Optional[int]
    seconds: float                 # CPU time of the call
    output: str = ""
    stdout: str = ""
    problems: List[str] = field(default_factory=list)


@dataclass
class Report:
    cases: int = 0
    invocations: int = 0
    exit_codes: Counter = field(default_factory=Counter)
    by_command: Counter = field(default_factory=Counter)
    codes: Counter = field(default_factory=Counter)          # diagnosis codes seen
    generators: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    internal_errors: int = 0
    tracebacks: int = 0
    hangs: int = 0
    false_checks: int = 0
    warnings: int = 0
    bad_json: int = 0
    inputs_changed: int = 0
    failures: List[str] = field(default_factory=list)     # the first 50, with spec and output
    problems: List[str] = field(default_factory=list)     # every problem, one line each
    slowest: float = 0.0

    def add(self, case: Case, outcome: Outcome) -> None:
        self.invocations += 1
        self.exit_codes[outcome.exit_code] += 1
        self.by_command[outcome.kind] += 1
        self.codes.update(set(re.findall(r"ATT-[EWI]\d{3}", outcome.output)))
        self.slowest = max(self.slowest, outcome.seconds)
        for problem in outcome.problems:
            kind = problem.split(":", 1)[0]
            counter = {"internal error": "internal_errors", "traceback": "tracebacks", "hang": "hangs",
                       "false check": "false_checks", "warning": "warnings", "json": "bad_json",
                       "input changed": "inputs_changed", "exit code": "internal_errors"}.get(kind)
            if counter:
                setattr(self, counter, getattr(self, counter) + 1)
            self.problems.append(f"seed {case.seed} {outcome.kind} {' '.join(outcome.argv[2:])[:120]}: "
                                 f"{problem.splitlines()[0][:200]}")
            if len(self.failures) < 50:
                self.failures.append(f"case seed {case.seed} ({case.generator} + {', '.join(case.mutations)}): "
                                     f"{outcome.kind} {' '.join(outcome.argv)[:300]}: {problem}\n"
                                     f"--- spec ---\n{case.text[:1500]}\n--- output ---\n{outcome.output[-1500:]}")

    @property
    def clean(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {"cases": self.cases, "invocations": self.invocations,
                "exit_codes": {str(k): v for k, v in sorted(self.exit_codes.items(), key=lambda kv: str(kv[0]))},
                "by_command": dict(self.by_command), "internal_errors": self.internal_errors,
                "tracebacks": self.tracebacks, "hangs": self.hangs, "false_checks": self.false_checks,
                "runtime_warnings": self.warnings, "bad_json": self.bad_json, "inputs_changed": self.inputs_changed,
                "slowest_cpu_seconds": round(self.slowest, 2), "distinct_codes": len(self.codes),
                "generators": dict(self.generators), "mutations": dict(self.mutations)}


def _judge_common(outcome: Outcome, wants_json: bool) -> None:
    if outcome.seconds > HANG_SECONDS:
        outcome.problems.append(f"hang: {outcome.seconds:.1f} s of CPU time")
    if "ATT-E999" in outcome.output:
        outcome.problems.append("internal error: ATT-E999")
    if "Traceback (most recent call last)" in outcome.output:
        outcome.problems.append("traceback: in the output")
    if outcome.exit_code not in EXIT_CODES and outcome.exit_code is not None:
        outcome.problems.append(f"exit code: {outcome.exit_code}")
    if wants_json and outcome.exit_code in EXIT_CODES:
        try:
            documents = _json_documents(outcome.stdout)
        except ValueError as exc:
            documents = []
            outcome.problems.append(f"json: stdout is not JSON ({exc})")
        else:
            if len(documents) != 1:
                outcome.problems.append(f"json: {len(documents)} documents on stdout")
            elif isinstance(documents[0], dict) and "exit_code" in documents[0] and \
                    documents[0]["exit_code"] != outcome.exit_code:
                outcome.problems.append(f"json: exit_code {documents[0]['exit_code']} but exited {outcome.exit_code}")
        for document in documents:
            _judge_trace_document(document, outcome)


def _json_documents(text: str) -> list:
    decoder, documents, position, text = json.JSONDecoder(), [], 0, text.strip()
    while position < len(text):
        document, position = decoder.raw_decode(text, position)
        documents.append(document)
        while position < len(text) and text[position].isspace():
            position += 1
    return documents


def _nonfinite(stats: dict, hook: str) -> bool:
    neginf_allowed = hook.endswith("attn_scores")
    return bool(stats.get("nan") or stats.get("posinf") or (stats.get("neginf") and not neginf_allowed))


def false_checks(passed: List[str], broken: List[str]) -> List[str]:
    """The checks listed as passed although a step they read holds NaN/inf ('' reads every step)."""
    return [check for check in passed if check in VALUE_CHECKS
            and any(hook.endswith(read) for hook in broken for read in VALUE_CHECKS[check])]


def _judge_trace_document(document, outcome: Outcome) -> None:
    """A JSON trace whose steps hold NaN/inf may not list a value check as passed."""
    hooks = document.get("hooks") if isinstance(document, dict) else None
    if not isinstance(hooks, dict):             # JSON format 2: hooks keyed by name, in step order
        return
    broken = [hook for hook, entry in hooks.items()
              if isinstance(entry, dict) and _nonfinite(entry.get("stats") or {}, hook)]
    passed = false_checks(document.get("checks_passed", []), broken)
    if passed:
        outcome.problems.append(f"false check: {passed} passed although {broken[0]} holds NaN/inf")


def invoke_cli(argv: List[str], stdin: str = "") -> Outcome:
    """One in-process CLI invocation, judged."""
    from click.testing import CliRunner

    from attntrace.cli.main import cli
    runner = CliRunner()
    start = time.process_time()
    outcome = Outcome(argv[0], argv, None, 0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with deadline(ALARM_SECONDS):
                result = runner.invoke(cli, argv, input=stdin, catch_exceptions=True)
        except Hang:
            outcome.seconds = time.process_time() - start
            outcome.problems.append(f"hang: stopped after {ALARM_SECONDS} s")
            return outcome
    outcome.seconds = time.process_time() - start
    outcome.exit_code = result.exit_code
    outcome.output, outcome.stdout = result.output, result.stdout
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback
        outcome.problems.append(f"traceback: {type(result.exception).__name__}: {str(result.exception)[:200]}\n"
                                + "".join(traceback.format_exception(result.exception))[-1500:])
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    if runtime:
        outcome.problems.append(f"warning: {runtime[0].category.__name__}: {runtime[0].message}")
    _judge_common(outcome, "--format" in argv and "json" in argv)
    return outcome


def invoke_api(case: Case) -> Outcome:
    """attntrace.run on the spec: only attntrace's own exceptions; no false ✓ on NaN/inf."""
    import attntrace
    from attntrace.errors import AttnTraceError
    outcome = Outcome("api", ["attntrace.run", str(case.spec_path)], 0, 0.0)
    start = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with deadline(ALARM_SECONDS):
                trace = attntrace.run(str(case.spec_path), check=case.rng.choice(["default", "all"]))
        except Hang:
            trace = None
            outcome.problems.append(f"hang: stopped after {ALARM_SECONDS} s")
        except AttnTraceError as error:
            trace = None
            outcome.exit_code = error.exit_code
            outcome.output = error.diagnosis.text()
        except Exception as error:            # noqa: BLE001 -- anything else is a bug of attntrace
            import traceback
            trace = None
            outcome.exit_code = 70
            outcome.problems.append(f"internal error: {type(error).__name__}: {str(error)[:200]}\n"
                                    + "".join(traceback.format_exception(error))[-1500:])
    outcome.seconds = time.process_time() - start
    if outcome.seconds > HANG_SECONDS and not any(p.startswith("hang") for p in outcome.problems):
        outcome.problems.append(f"hang: {outcome.seconds:.1f} s of CPU time")
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    if runtime:
        outcome.problems.append(f"warning: {runtime[0].category.__name__}: {runtime[0].message}")
    if trace is not None:
        outcome.exit_code = 1 if trace.warnings else 0
        outcome.output = " ".join(d.code for d in trace.diagnoses)
        broken = [hook for hook, stats in trace.stats.items() if _nonfinite(stats.to_json(), hook)]
        passed = false_checks(trace.checks_passed, broken)
        if passed:
            outcome.problems.append(f"false check: {passed} passed although {broken[0]} holds NaN/inf")
    return outcome


def dump(spec: dict) -> str:
    """YAML text of a generated spec, with matrices as inline rows (so mutations find them)."""
    return yaml.safe_dump(spec, default_flow_style=None, sort_keys=False, width=10 ** 6, allow_unicode=True)


class Fuzzer:
    """Draws cases from the registries and judges every invocation."""

    def __init__(self, seed: int = 0, folder: Optional[Path] = None):
        self.seed = seed
        self.folder = folder
        self.report = Report()

    def make_case(self, index: int, folder: Path) -> Case:
        seed = self.seed * 1_000_003 + index
        rng = random.Random(seed)
        case = Case(folder, seed, rng)
        case.generator = rng.choice(sorted(SPECS))
        text = dump(SPECS[case.generator](rng))
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            name = rng.choice(sorted(MUTATIONS))
            case.mutations.append(name)
            text = MUTATIONS[name](rng, text, case)
        case.text = text
        case.spec_path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return case

    def run_case(self, index: int, folder: Path) -> List[Outcome]:
        folder.mkdir(parents=True, exist_ok=True)
        case = self.make_case(index, folder)
        self.report.cases += 1
        self.report.generators[case.generator] += 1
        self.report.mutations.update(case.mutations)
        before = case.fingerprint()
        names = case.rng.sample(sorted(COMMANDS), k=2) + ["api"]
        outcomes = []
        for name in names:
            if name == "api":
                outcome = invoke_api(case)
            else:
                argv, stdin = COMMANDS[name](case.rng, case)
                outcome = invoke_cli(argv, stdin)
            after = case.fingerprint()
            changed = [path for path, digest in before.items() if after.get(path) != digest]
            if changed:
                outcome.problems.append(f"input changed: {changed[0]}")
                before = after
            self.report.add(case, outcome)
            outcomes.append(outcome)
        return outcomes

    def run(self, cases: int, folder: Path, on_case: Optional[Callable[[int], None]] = None) -> Report:
        import shutil
        for index in range(cases):
            case_folder = folder / f"case{index}"
            self.run_case(index, case_folder)
            shutil.rmtree(case_folder, ignore_errors=True)
            if on_case is not None:
                on_case(index)
        return self.report


def budget(default: int) -> int:
    """Cases to run: ATTNTRACE_FUZZ_CASES overrides the default."""
    import os
    value = os.environ.get("ATTNTRACE_FUZZ_CASES")
    return int(value) if value and value.isdigit() else default

