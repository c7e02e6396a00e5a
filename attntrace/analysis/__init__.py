"""The analysis layer: diagnosis, invariant checks, bug catalogue, expectations, diffs, head scores."""
