"""Positional encodings: tables added to X, and rotations applied to Q and K."""
from __future__ import annotations

import numpy as np


def sinusoidal(seq: int, d_model: int, base: float = 10000.0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / base^(2i/d_model)), PE[pos, 2i+1] = cos(same) (seed 004)."""
    position = np.arange(seq)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2) * -(np.log(base) / d_model))
    table = np.zeros((seq, d_model))
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)[:, : d_model // 2]
    return table
