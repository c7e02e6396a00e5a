"""attntrace: trace, explain and debug scaled dot-product attention, step by step.

    >>> import attntrace
    >>> spec = attntrace.load_spec("configs/seed002_abc.yaml")
    >>> trace = attntrace.run(spec)
    >>> trace["attn.hook_pattern"]        # (batch, n_heads, seq_q, seq_k)

Imports are lazy so that `attntrace --help` starts instantly.
"""
__version__ = "0.1.0"

__all__ = ["load_spec", "load_spec_text", "run", "Trace", "Spec", "AttnTraceError", "capture", "tap",
           "check_capture", "release_buffers", "__version__"]


def _notebook_display(trace) -> str:
    """A Trace in Jupyter: the offline HTML explorer.  The package's face wires it, because
    core/ (where Trace lives) must not import render/ (where drawing lives)."""
    from attntrace.render.trace_explorer import trace_html
    return trace_html(trace)


def __getattr__(name):
    if name in ("capture", "tap"):
        # torch is imported only when a capture starts; bound once, because tap() runs inside forwards
        from attntrace.models import capture as capture_module
        value = globals()[name] = getattr(capture_module, name)
        return value
    if name == "release_buffers":         # the score buffer kept for the next run (core/memory.py)
        from attntrace.core.memory import release_buffers
        return release_buffers
    if name == "check_capture":
        from attntrace.analysis.capture import check_capture
        return check_capture
    if name in ("load_spec", "load_spec_text", "Spec"):
        from attntrace.inputs import spec
        return getattr(spec, name)
    if name in ("run", "Trace"):
        from attntrace.analysis.run import run
        from attntrace.core.trace import Trace
        Trace._repr_html_ = _notebook_display
        return run if name == "run" else Trace
    if name == "AttnTraceError":
        from attntrace.errors import AttnTraceError
        return AttnTraceError
    raise AttributeError(f"module 'attntrace' has no attribute {name!r}")
