"""The core layer: hook points, pure kernels, plan, engine and trace."""
