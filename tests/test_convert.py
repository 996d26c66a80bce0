"""Bulk copy-and-cast used by checkpoint loading (`webui.runtime.convert`): the same bits as
torch's own casts, every piece copied once, the torch thread count left as it was."""

from __future__ import annotations

import pytest
import torch

import webui.runtime.convert as convert
from webui.runtime.convert import Source, cast_copy, convert_into

PAIRS = [
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.int64, torch.int64),
]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:  # NaN payloads may differ; NaN positions and every other value may not
        nan = torch.isnan(a)
        return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan])
    return torch.equal(a, b)


@pytest.mark.parametrize("src_dtype,dst_dtype", PAIRS)
def test_cast_copy_matches_torch(src_dtype: torch.dtype, dst_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    if src_dtype.is_floating_point:
        src = (torch.randn(300_001, generator=g) * 500).to(src_dtype)
        src[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 6e-8]).to(src_dtype)
    else:
        src = torch.randint(-(2**40), 2**40, (300_001,), generator=g, dtype=src_dtype)
    dst = torch.empty(src.shape, dtype=dst_dtype)
    cast_copy(dst, src, torch.empty(1000, dtype=torch.float32))  # a small stage: many blocks
    assert _same_bits(dst, src.to(dst_dtype))


def test_convert_into_many_pieces_on_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert, "PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(convert, "PARALLEL_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(1)
    sources = [torch.randn(n, generator=g).half() for n in (1, 7, 100_000, 250_003, 33)]
    released: list[tuple[int, int, int]] = []

    def source(i: int, t: torch.Tensor) -> Source:
        return Source(t.numel(), lambda a, b: t[a:b], lambda a, b: released.append((i, a, b)))

    jobs = [(source(i, t), torch.empty(t.shape, dtype=torch.bfloat16)) for i, t in enumerate(sources)]
    threads = torch.get_num_threads()
    convert_into(jobs, threads=2)
    assert torch.get_num_threads() == threads
    for (_, dst), src in zip(jobs, sources):
        assert torch.equal(dst, src.to(torch.bfloat16))
    for i, t in enumerate(sources):  # every element released exactly once
        spans = sorted((a, b) for j, a, b in released if j == i)
        assert spans[0][0] == 0 and spans[-1][1] == t.numel()
        assert all(b1 == a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))


def test_convert_into_refuses_a_wrong_destination() -> None:
    src = torch.zeros(10)
    with pytest.raises(ValueError):
        convert_into([(Source.of(src), torch.empty(9))])
    with pytest.raises(ValueError):
        convert_into([(Source.of(src), torch.empty(10, 2).t()[0])])
