"""Weights kept in float8 in memory, computed in the runtime's dtype.

Most Flux downloads (and some SD3.5 ones) store the transformer's linear weights as
`float8_e4m3fn`. Loading keeps them so (half the memory of bfloat16) and each such layer casts its
weight to the input's dtype when it runs: the arithmetic is the runtime's, the weight is what the
file holds, exactly as an upcast at load would give, at the cost of one cast a layer a call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, self.weight.to(x.dtype), bias)


def compute_float8_linears(module: nn.Module) -> int:
    """Make every nn.Linear of `module` whose weight is float8 upcast it when called; how many."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and layer.weight.dtype in FLOAT8:
            layer.forward = types.MethodType(_forward, layer)
            count += 1
    return count
