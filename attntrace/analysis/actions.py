"""Built-in hook actions: print, save, zero, ablate a head, patch, scale, clamp.

An action is a factory returning an ordinary hook ``fn(array, *, hook)``, so the
engine fires it like any Python hook.  The same actions are written two ways:

    --hook attn.hook_pattern:ablate-head=1            (command line, repeatable)
    hooks:                                            (a spec's `hooks:` list)
      - attn.hook_pattern:ablate-head=1               the command-line form, or
      - {hook: attn.hook_z, scale: 0.5}               a mapping: hook + one action

Files named by `save` and `patch` are relative to the current folder on the
command line and to the spec's folder in a spec.  `patch` reads .npy/.npz
without pickle; `save` writes .npz atomically and never over an input file.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from attntrace.core.hooks import HookFn
from attntrace.errors import InputError, Location, input_error
from attntrace.hookpoints import HookPoint, match_hooks
from attntrace.text import did_you_mean

HOOK_SYNTAX = "HOOK:ACTION[=ARG], e.g. attn.hook_pattern:ablate-head=1"


@dataclass
class ActionContext:
    """What parsing needs: where files live, which files must not be overwritten."""

    base_dir: Path = field(default_factory=Path.cwd)
    protected: Set[Path] = field(default_factory=set)     # input files: never a `save` target
    read_files: Set[Path] = field(default_factory=set)    # filled by `patch`: inputs of this run
    sinks: Dict[Path, Dict[str, np.ndarray]] = field(default_factory=dict)   # save file -> arrays


@dataclass(frozen=True)
class Origin:
    """Where a hook action was written, for messages."""

    text: str                           # "--hook 'attn.hook_q:scale=2'" or "hooks[1]"
    location: Optional[Location] = None

    def error(self, code: str, message: str, hint: Optional[str] = None):
        return input_error(code, f"{self.text}: {message}", self.location, hint=hint)


# --------------------------------------------------------------------------- argument readers

def _shown(arg: Any) -> str:
    """An argument as a message shows it: short, and never the digits of a huge integer."""
    from attntrace.inputs.sources import describe_value
    return repr(arg) if isinstance(arg, str) and len(arg) < 40 else describe_value(arg)


def _number(arg: Any, origin: Origin, action: str) -> float:
    try:
        if isinstance(arg, bool):
            raise ValueError
        value = float(arg) if isinstance(arg, (str, numbers.Real)) else None
    except (ValueError, OverflowError):
        value = None
    if value is None or not np.isfinite(value):
        raise origin.error("ATT-E061", f"{action} needs a finite number, got {_shown(arg)}",
                           hint=f"e.g. {action}=0.5")
    return value


def _heads(arg: Any, origin: Origin, action: str) -> List[int]:
    items = arg if isinstance(arg, list) else arg.split(",") if isinstance(arg, str) else [arg] \
        if arg is not None else []
    heads = []
    for item in items:
        text = item.strip() if isinstance(item, str) else None
        if isinstance(item, numbers.Integral) and not isinstance(item, bool) and 0 <= item < 1 << 31:
            heads.append(int(item))
        elif text is not None and text.isdigit() and len(text) < 10:      # int() of 5,000 digits would fail
            heads.append(int(text))
        else:
            raise origin.error("ATT-E061", f"{action} needs head numbers (from 0), got {_shown(arg)}",
                               hint=f"e.g. {action}=1 or {action}=0,2")
    if not heads:
        raise origin.error("ATT-E061", f"{action} needs head numbers (from 0)", hint=f"e.g. {action}=1")
    return heads


def _bounds(arg: Any, origin: Origin) -> Tuple[Optional[float], Optional[float]]:
    parts = arg if isinstance(arg, list) else arg.split(",") if isinstance(arg, str) else [arg] \
        if arg is not None else []
    if len(parts) != 2:
        raise origin.error("ATT-E061", f"clamp needs LOW,HIGH (either may be empty), got {_shown(arg)}",
                           hint="e.g. clamp=-5,5 or clamp=,10 (no lower bound)")
    low, high = (None if p is None or (isinstance(p, str) and not p.strip()) else _number(p, origin, "clamp")
                 for p in parts)
    if low is None and high is None:
        raise origin.error("ATT-E061", "clamp needs at least one bound", hint="e.g. clamp=-5,5")
    if low is not None and high is not None and low > high:
        raise origin.error("ATT-E061", f"clamp bounds are reversed: {low:g} > {high:g}")
    return low, high


def _file(arg: Any, origin: Origin, ctx: ActionContext, action: str, suffixes: Sequence[str]) -> Path:
    if not isinstance(arg, str) or not arg.strip():
        raise origin.error("ATT-E061", f"{action} needs a file name",
                           hint=f"e.g. {action}=activations{suffixes[0]}")
    path = Path(arg.strip())
    if path.suffix.lower() not in suffixes:
        raise origin.error("ATT-E061", f"{action} takes a {' or '.join(suffixes)} file, got '{path.name}'")
    return path if path.is_absolute() else ctx.base_dir / path


# --------------------------------------------------------------------------- helpers on activations

def head_axis(hook: HookPoint) -> Optional[int]:
    for name in ("n_heads", "n_kv_heads"):
        if name in hook.axes:
            return hook.axes.index(name)
    return None


def head_slice(array: np.ndarray, hook: HookPoint, head: int, origin: Origin) -> Tuple:
    """The index of one head's values in an activation."""
    axis = head_axis(hook)
    if axis is None:
        # z_concat has heads side by side, but a hook sees no head count: use hook_z there
        raise origin.error("ATT-E061", f"{hook.name} has no head axis (axes: {', '.join(hook.axes)})",
                           hint="heads live in attn.hook_q/k/v, attn.hook_qk ... attn.hook_pattern and "
                                "attn.hook_z (ablate there instead of in hook_z_concat)")
    count = array.shape[axis]
    if head >= count:
        kind = "kv head(s)" if hook.axes[axis] == "n_kv_heads" else "head(s)"
        raise origin.error("ATT-E061", f"head {head} does not exist: {hook.name} has {count} {kind}, "
                                       f"numbered from 0")
    index: List[Any] = [slice(None)] * array.ndim
    index[axis] = head
    return tuple(index)


def _numeric(array: np.ndarray, hook: HookPoint, origin: Origin, action: str) -> None:
    if array.dtype == bool:
        raise origin.error("ATT-E061", f"{action} does not apply to {hook.name}, a True/False mask",
                           hint="use zero (block everything) or patch with a 0/1 matrix")


# --------------------------------------------------------------------------- the actions

MAX_PRINT_DECIMALS = 16      # float64 holds 15-17 significant digits; more would print noise


def _decimals(arg: Any, origin: Origin) -> int:
    if arg in (None, True, ""):
        return 4
    value = _number(arg, origin, "print")
    if value != int(value) or not 0 <= value <= MAX_PRINT_DECIMALS:
        raise origin.error("ATT-E061", f"print takes a number of decimals from 0 to {MAX_PRINT_DECIMALS}, "
                                       f"got {_shown(arg)}", hint="e.g. print=3")
    return int(value)


def act_print(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    precision = _decimals(arg, origin)

    def print_activation(array, *, hook):
        # sys.stdout is looked up per call, so a command can redirect it (JSON mode)
        shape = ", ".join(f"{a}={s}" for a, s in zip(hook.axes, array.shape))
        text = np.array2string(array, precision=precision, suppress_small=True, threshold=400, edgeitems=3)
        sys.stdout.write(f"── {hook.name} ({shape}) ──\n{text}\n")
    print_activation.side_effect = True
    return print_activation


def act_save(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    from attntrace.inputs.files import atomic_write, check_writable, refuse_inputs
    path = _file(arg, origin, ctx, "save", (".npz",))
    check_writable(path, origin.text, origin.location)      # before the run, not when the hook fires
    refuse_inputs(path, ctx.protected, origin.text)
    sink = ctx.sinks.setdefault(path.resolve(), {})

    def save_activation(array, *, hook):
        sink[hook.name] = np.array(array)          # a copy: later steps may work in place
        atomic_write(path, lambda f: np.savez(f, **sink))
    save_activation.side_effect = True
    return save_activation


def act_zero(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    def zero(array, *, hook):
        return np.zeros_like(array)
    return zero


def act_ablate_head(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    heads = _heads(arg, origin, "ablate-head")

    def ablate_head(array, *, hook):
        out = array.copy()
        for head in heads:
            out[head_slice(out, hook, head, origin)] = 0
        return out
    return ablate_head


def act_scale(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    factor = _number(arg, origin, "scale")

    def scale(array, *, hook):
        _numeric(array, hook, origin, "scale")
        return array * array.dtype.type(factor)
    return scale


def act_clamp(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    low, high = _bounds(arg, origin)

    def clamp(array, *, hook):
        _numeric(array, hook, origin, "clamp")
        return np.clip(array, low, high)
    return clamp


def act_patch(arg: Any, origin: Origin, ctx: ActionContext) -> HookFn:
    from attntrace.inputs.sources import SourceContext, load_array
    text = arg.strip() if isinstance(arg, str) else ""
    name, _, key = text.rpartition(":") if ".npz:" in text else (text, "", "")
    path = _file(name, origin, ctx, "patch", (".npy", ".npz"))
    if not path.is_file():
        raise origin.error("ATT-E007", f"patch file not found: {path}")
    ctx.read_files.add(path.resolve())
    source_ctx = SourceContext(ctx.base_dir, lambda _path: origin.location)
    stored = _npz_keys(path, origin) if path.suffix.lower() == ".npz" else None

    def patch(array, *, hook):
        if stored is None:
            values = load_array({"npy": str(path)}, source_ctx, [], allow_bool=True)
        else:
            chosen = key or (hook.name if hook.name in stored else stored[0] if len(stored) == 1 else None)
            if chosen is None:
                raise origin.error("ATT-E062", f"{path.name} holds no array named '{hook.name}' "
                                               f"(it holds: {', '.join(stored)})",
                                   hint=f"name the array: patch={path.name}:KEY")
            values = load_array({"npz": str(path), "key": chosen}, source_ctx, [], allow_bool=True)
        return fit_shape(values, array, hook, f"{origin.text}: {path.name}")
    return patch


def _npz_keys(path: Path, origin: Origin) -> List[str]:
    from attntrace.inputs.sources import BadArrayFile, npz_keys, open_npz
    try:
        with open_npz(path) as archive:
            return npz_keys(archive)
    except BadArrayFile as exc:
        raise origin.error(exc.code, exc.message, hint=exc.hint) from None
    except OSError as exc:
        raise origin.error("ATT-E007", f"cannot read {path.name}: {exc.strerror or exc}") from None


def fit_shape(values: np.ndarray, array: np.ndarray, hook: HookPoint, what: str) -> np.ndarray:
    """Accept the activation's shape, or the same shape written without its size-1 axes."""
    if values.shape == array.shape:
        return values
    if values.size == array.size and tuple(s for s in values.shape if s != 1) == \
            tuple(s for s in array.shape if s != 1):
        return values.reshape(array.shape)
    shape = ", ".join(f"{a}={s}" for a, s in zip(hook.axes, array.shape))
    raise input_error("ATT-E062", f"{what} has shape {tuple(values.shape)}, but {hook.name} is ({shape})",
                      hint="patch with an array of the activation's shape (size-1 batch/head axes may be left out)")


@dataclass(frozen=True)
class Action:
    name: str
    argument: str                       # "" when the action takes none
    what: str
    factory: Callable[[Any, Origin, ActionContext], HookFn]
    needs_argument: bool = True


ACTIONS: Dict[str, Action] = {a.name: a for a in (
    Action("print", "[DECIMALS]", "print the activation (to stdout) as the run passes it", act_print, False),
    Action("save", "FILE.npz", "save the activation into FILE.npz under its hook name", act_save),
    Action("zero", "", "replace the whole activation by zeros", act_zero, False),
    Action("ablate-head", "H[,H...]", "zero head H (zero ablation); in hook_pattern the head then "
                                      "mixes no value", act_ablate_head),
    Action("patch", "FILE.npy|FILE.npz[:KEY]", "replace the activation by an array from a file "
                                               "(npz key defaults to the hook name)", act_patch),
    Action("scale", "FACTOR", "multiply the activation by FACTOR", act_scale),
    Action("clamp", "LOW,HIGH", "clip values into [LOW, HIGH]; either bound may be empty", act_clamp),
)}
ALIASES = {"zero-head": "ablate-head", "ablate": "ablate-head"}


# --------------------------------------------------------------------------- parsing

def make_action(hook: str, action: str, arg: Any, origin: Origin, ctx: ActionContext) -> Tuple[str, HookFn]:
    """(hook pattern, fn) for one action, after checking the hook name and the action."""
    try:
        match_hooks(hook, None, origin.location)    # did-you-mean for typos, before running
    except InputError as exc:
        raise exc.prefixed(origin.text) from None
    name = ALIASES.get(action, action)
    if name not in ACTIONS:
        raise origin.error("ATT-E060", f"unknown hook action '{action}'",
                           hint=did_you_mean(action, list(ACTIONS) + list(ALIASES),
                                             otherwise=f"actions: {', '.join(ACTIONS)}"))
    spec = ACTIONS[name]
    if spec.needs_argument and arg in (None, ""):
        raise origin.error("ATT-E060", f"{name} needs an argument: {name}={spec.argument}")
    if not spec.argument and arg not in (None, "", True):
        raise origin.error("ATT-E060", f"{name} takes no argument")
    fn = spec.factory(arg, origin, ctx)
    huge = isinstance(arg, numbers.Integral) and int(arg).bit_length() > 256     # str() would fail
    fn.description = f"{hook}:{name}" + (f"={_shown(arg) if huge else arg}" if arg not in (None, "", True) else "")
    return hook, fn


def parse_hook_text(text: str, ctx: ActionContext, origin: Optional[Origin] = None) -> Tuple[str, HookFn]:
    """`attn.hook_pattern:ablate-head=1` -> (hook, fn)."""
    origin = origin or Origin(f"--hook '{text}'")
    hook, colon, rest = text.partition(":")
    if not colon or not hook.strip() or not rest.strip():
        raise origin.error("ATT-E060", f"a hook action is written {HOOK_SYNTAX}",
                           hint=f"actions: {', '.join(ACTIONS)}")
    action, _, arg = rest.partition("=")
    return make_action(hook.strip(), action.strip(), arg.strip() if arg else None, origin, ctx)


def parse_hook_texts(texts: Sequence[str], ctx: ActionContext) -> List[Tuple[str, HookFn]]:
    return [parse_hook_text(text, ctx) for text in texts]


def hooks_from_spec(spec, ctx: Optional[ActionContext] = None) -> List[Tuple[str, HookFn]]:
    """The spec's `hooks:` list as (hook, fn) pairs; files are relative to the spec's folder."""
    if not spec.hooks:
        return []
    if ctx is None:
        from attntrace.inputs.files import input_files
        base = Path(spec.file).resolve().parent if spec.file else Path.cwd()
        ctx = ActionContext(base_dir=base, protected=input_files(spec))
    hooks = []
    for i, item in enumerate(spec.hooks):
        origin = Origin(f"hooks[{i}]", spec.locate(["hooks", i]))
        if isinstance(item, str):
            hooks.append(parse_hook_text(item, ctx, origin))
        elif isinstance(item, dict):
            hooks.append(_hook_from_mapping(item, origin, ctx))
        else:
            raise origin.error("ATT-E060", f"each item of hooks: is a string ({HOOK_SYNTAX}) or a "
                                           "mapping such as {hook: attn.hook_z, scale: 0.5}")
    refuse_saving_over_reads(ctx)
    return hooks


def refuse_saving_over_reads(ctx: ActionContext) -> None:
    """A `save` may not write the file a `patch` of the same run reads (in whichever order they come)."""
    read = {Path(p).resolve() for p in ctx.read_files}
    for sink in ctx.sinks:
        if sink in read:
            raise input_error("ATT-E064", f"save: refusing to overwrite {sink}, a file a patch of this run reads",
                              hint="save into another file")


def _hook_from_mapping(item: Dict, origin: Origin, ctx: ActionContext) -> Tuple[str, HookFn]:
    hook = item.get("hook")
    actions = [k for k in item if k != "hook"]
    if not isinstance(hook, str) or len(actions) != 1:
        raise origin.error("ATT-E060", "a hook mapping has `hook:` and exactly one action, "
                                       "e.g. {hook: attn.hook_pattern, ablate-head: 1}",
                           hint=f"actions: {', '.join(ACTIONS)}")
    return make_action(hook, str(actions[0]), item[actions[0]], origin, ctx)


def without_side_effects(hooks: Sequence[Tuple[str, HookFn]]) -> List[Tuple[str, HookFn]]:
    """Hooks that change activations, without print/save (for re-runs nobody should see)."""
    return [(name, fn) for name, fn in hooks if not getattr(fn, "side_effect", False)]


def command_hooks(texts: Sequence[str], hook_file: Optional[Path], spec) -> Tuple[List[Tuple[str, HookFn]], Set[Path]]:
    """`--hook` and `--hook-file`: the run's extra hooks, and every input file of the run
    (the spec, its array files, the hook file, patch files) that exports must not overwrite."""
    from attntrace.inputs.files import input_files
    inputs = input_files(spec)
    if hook_file is not None:
        inputs.add(Path(hook_file).resolve())
    spec_ctx = ActionContext(base_dir=Path(spec.file).resolve().parent if spec.file else Path.cwd(),
                             protected=set(inputs))
    hooks_from_spec(spec, spec_ctx)                 # the patch files the spec's own hooks read
    ctx = ActionContext(protected=inputs | spec_ctx.read_files)
    hooks = parse_hook_texts(texts, ctx)
    refuse_saving_over_reads(ctx)
    if hook_file is not None:
        from attntrace.analysis.userhooks import load_hook_file
        hooks += load_hook_file(hook_file)
    return hooks, inputs | ctx.read_files


def hook_summary(spec, extra: Sequence[Tuple[str, HookFn]]) -> str:
    """One line naming every hook of a run (spec's and command line's), or "" when there are none."""
    names = [getattr(fn, "description", f"{name}:{getattr(fn, '__name__', 'fn')}")
             for name, fn in hooks_from_spec(spec) + list(extra)]
    return f"hooks: {', '.join(names)}" if names else ""
