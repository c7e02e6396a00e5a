"""Analysis: what a trace means -- pre-flight diagnosis, fixes, invariant checks, the bug
catalogue, expectations, diffs, gradient checks, head scores; and the one run() that
orchestrates a trace (run.py)."""
