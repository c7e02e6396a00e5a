"""The core: pure kernels (ops, masks, positions, chunked attention), the plan (sizes only),
the engine that executes it, the backward pass, stats and the Trace."""
