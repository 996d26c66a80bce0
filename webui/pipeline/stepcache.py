"""Step caching: reuse a denoiser's deep features for some model calls and recompute only its
shallow part (DeepCache, Ma et al. 2023, for UNets).

The deep features of a UNet change slowly from one step to the next, its shallow ones (the first
layers down and the last layers up, joined by the outermost skip connections) carry the detail.
On a "full" call every layer runs and each deep layer's output is kept; on a "cached" call the
deep layers return what they returned on the last full call, and only the shallow ones run.

`branch` says how much stays fresh, counted in skip connections from the outside in, as
DeepCache's `cache_branch_id`: branch 0 runs `conv_in`, the first down layer and the last two up
layers; each further branch adds the next layer down and the up layer that takes its skip.

Which calls are full is a rule (`CacheRule`), asked when the first cached module is reached, so
that it can look at what the fresh layers before it computed (`Call.probe`, the output of a
chosen module, and `Call.probe_at_full`, the same on the last full call). `every(n)` runs the
whole model on every n-th call of a sampling run (calls, not sampler steps: a second-order
sampler calls the model twice per step). `first_block_change(t)` runs it whenever the probe moved
by more than a relative `t` since the last full call: the "first-block cache" rule, for the
transformer families (freeze every block after the first, probe the first).

Installed per sampling run (`step_cache`) by replacing the chosen modules' `forward` and undone
after it: the model is left as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """What a rule sees of a model call that could reuse the cache."""

    number: int  # within the sampling run, 0-based
    probe: torch.Tensor | None  # the probe module's output on this call (None: no probe)
    probe_at_full: torch.Tensor | None  # its output on the last full call


CacheRule = Callable[[Call], bool]  # -> run the whole model?


def every(n: int) -> CacheRule:
    """The whole model on calls 0, n, 2n, ...; the shallow part only in between."""
    return lambda call: call.number % n == 0


def first_block_change(threshold: float) -> CacheRule:
    """The whole model when the probe's output moved by more than `threshold` (mean absolute
    change over mean absolute value) since the last full call."""
    def rule(call: Call) -> bool:
        if call.probe is None or call.probe_at_full is None or call.probe.shape != call.probe_at_full.shape:
            return True
        now, then = call.probe.float(), call.probe_at_full.float()
        return float((now - then).abs().mean() / then.abs().mean().clamp_min(1e-8)) > threshold
    return rule


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
    their output of the last full call. `probe`: a module that runs fresh before them, whose
    output the rule may compare."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], rule: CacheRule,
                 probe: nn.Module | None = None) -> None:
        self.model, self.modules, self.rule, self.probe = model, modules, rule, probe
        self.calls = 0
        self.full_calls = 0
        self._decided = False
        self.reuse = False
        self._outputs: dict[int, Any] = {}
        self._shape: tuple[int, ...] | None = None
        self._probe_now: torch.Tensor | None = None
        self._probe_full: torch.Tensor | None = None

    def _before_call(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs.get("sample")
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
        # another size or batch (a hires pass, a nested job) cannot reuse these features
        self._decided = not self._outputs or shape != self._shape
        if self._decided:
            self._full(shape)
        self.calls += 1

    def _full(self, shape: tuple[int, ...] | None) -> None:
        self.reuse = False
        self._outputs.clear()
        self._shape = shape
        self._probe_full = self._probe_now
        self.full_calls += 1

    def _decide(self) -> None:
        """At the first cached module of a call: ask the rule."""
        self._decided = True
        if self.rule(Call(self.calls - 1, self._probe_now, self._probe_full)):
            self._full(self._shape)
        else:
            self.reuse = True

    def _keep_probe(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self._probe_now = output[0] if isinstance(output, tuple) else output
        if self._decided and not self.reuse:  # a call already known to be full (the first, a new size)
            self._probe_full = self._probe_now

    def _wrap(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            if not self._decided:
                self._decide()
            if self.reuse:
                return self._outputs[index]
            out = self._outputs[index] = forward(*args, **kwargs)
            return out
        return cached_forward

    @contextlib.contextmanager
    def installed(self) -> Iterator[StepCache]:
        own = [m.__dict__.get("forward") for m in self.modules]  # a forward set on the instance, if any
        handles = [self.model.register_forward_pre_hook(self._before_call, with_kwargs=True)]
        if self.probe is not None:
            handles.append(self.probe.register_forward_hook(self._keep_probe))
        try:
            for i, m in enumerate(self.modules):
                m.forward = self._wrap(i, m.forward)  # type: ignore[method-assign]
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for m, forward in zip(self.modules, own):
                if forward is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = forward  # type: ignore[method-assign]
            self._outputs.clear()
            self._probe_now = self._probe_full = None


@contextlib.contextmanager
def step_cache(unet: Any, interval: int, branch: int = 0) -> Iterator[StepCache | None]:
    """DeepCache on `unet` while the block runs: the whole model every `interval` calls. Off (None)
    when the interval is 0 or 1, the model is not a UNet, or it is compiled (`--compile`: swapping
    its modules' forward would make torch.compile trace again on every call)."""
    modules = unet_deep_modules(unet, branch) if interval > 1 else None
    if modules and getattr(unet, "_compiled_call_impl", None) is not None:
        log.warning("step caching is off: the UNet is compiled (--compile), and the two do not mix")
        modules = None
    if not modules:
        yield None
        return
    with StepCache(unet, modules, every(interval)).installed() as cache:
        yield cache
