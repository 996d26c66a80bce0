"""Step caching: reuse a denoiser's deep features for some model calls and recompute only its
shallow part (DeepCache, Ma et al. 2023, for UNets).

The deep features of a UNet change slowly from one step to the next, its shallow ones (the first
layers down and the last layers up, joined by the outermost skip connections) carry the detail.
On a "full" call every layer runs and each deep layer's output is kept; on a "cached" call the
deep layers return what they returned on the last full call, and only the shallow ones run.

`branch` says how much stays fresh, counted in skip connections from the outside in, as
DeepCache's `cache_branch_id`: branch 0 runs `conv_in`, the first down layer and the last two up
layers; each further branch adds the next layer down and the up layer that takes its skip.

Which calls are full is a rule (`CacheRule`): `every(n)` runs the whole model on every n-th call
of a sampling run (calls, not sampler steps: a second-order sampler calls the model twice per
step). The seam takes other rules and other module lists: a transformer family would freeze all
blocks after its first and decide from the first block's change (first-block cache), without
touching the runner.

Installed per sampling run (`step_cache`) by replacing the chosen modules' `forward` and undone
after it: the model is left as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

CacheRule = Callable[[int], bool]  # call number within the run (0-based) -> run the whole model?


def every(n: int) -> CacheRule:
    """The whole model on calls 0, n, 2n, ...; the shallow part only in between."""
    return lambda call: call % n == 0


def _layers(block: nn.Module) -> list[list[nn.Module]]:
    """A UNet block's layers, in the order they run: each resnet with its attention, if any."""
    attentions = list(getattr(block, "attentions", None) or [])
    return [[resnet, *([attentions[i]] if i < len(attentions) else [])]
            for i, resnet in enumerate(block.resnets)]


def unet_deep_modules(unet: Any, branch: int) -> list[nn.Module] | None:
    """The modules a cached call skips for `branch` (see the module docstring); None for a model
    that is not a diffusers UNet (no down/up blocks)."""
    down_blocks, up_blocks = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    if down_blocks is None or up_blocks is None or getattr(unet, "mid_block", None) is None:
        return None
    # down path: one unit per skip connection it makes (conv_in makes skip 0 and is always fresh)
    down: list[list[nn.Module]] = []
    for block in down_blocks:
        down += _layers(block)
        down += [[d] for d in (getattr(block, "downsamplers", None) or [])]
    # up path, in running order: (modules, the skip each layer takes, or None for an upsampler)
    up: list[tuple[list[nn.Module], int | None]] = []
    skip = len(down)  # the highest skip number; up layers take them from the deepest to skip 0
    for block in up_blocks:
        for layer in _layers(block):
            up.append((layer, skip))
            skip -= 1
        up += [([u], None) for u in (getattr(block, "upsamplers", None) or [])]
    fresh = branch + 1  # skips 0..fresh stay fresh: made by conv_in and down[:fresh]
    if fresh >= len(down):
        return []
    deep = [m for unit in down[fresh:] for m in unit] + [unet.mid_block]
    for modules, taken in up:
        if taken is not None and taken <= fresh:
            break
        deep += modules
    return deep


class StepCache:
    """Replaces `modules`' forward while installed: on calls the rule marks as cached they return
    their output of the last full call."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], rule: CacheRule) -> None:
        self.model, self.modules, self.rule = model, modules, rule
        self.calls = 0
        self.full_calls = 0
        self.reuse = False
        self._outputs: dict[int, Any] = {}
        self._shape: tuple[int, ...] | None = None

    def _before_call(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs.get("sample")
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
        # another size or batch (a hires pass, a nested job) cannot reuse these features
        self.reuse = bool(self._outputs) and shape == self._shape and not self.rule(self.calls)
        if not self.reuse:
            self._outputs.clear()
            self._shape = shape
            self.full_calls += 1
        self.calls += 1

    def _wrap(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            if self.reuse:
                return self._outputs[index]
            out = self._outputs[index] = forward(*args, **kwargs)
            return out
        return cached_forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepCache]:
        own = [m.__dict__.get("forward") for m in self.modules]  # a forward set on the instance, if any
        handle = self.model.register_forward_pre_hook(self._before_call, with_kwargs=True)
        try:
            for i, m in enumerate(self.modules):
                m.forward = self._wrap(i, m.forward)  # type: ignore[method-assign]
            yield self
        finally:
            handle.remove()
            for m, forward in zip(self.modules, own):
                if forward is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = forward  # type: ignore[method-assign]
            self._outputs.clear()


@contextlib.contextmanager
def step_cache(unet: Any, interval: int, branch: int = 0) -> Iterator[StepCache | None]:
    """DeepCache on `unet` while the block runs: the whole model every `interval` calls (off when
    the interval is 0 or 1, or the model is not a UNet)."""
    modules = unet_deep_modules(unet, branch) if interval > 1 else None
    if not modules:
        yield None
        return
    with StepCache(unet, modules, every(interval)).installed() as cache:
        yield cache
