"""bench/gpu.py: the CPU smoke run over the whole matrix, the no-CUDA exit, the docs section."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu.py"
BEFORE = "# Performance\n\nHand-written text above the results.\n\n"
AFTER = "\n\n## Notes\n\nHand-written text below the results.\n"


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)


def _gpu_module() -> ModuleType:
    """bench/gpu.py as a module (torch is imported only inside its functions)."""
    if "bench_gpu" in sys.modules:
        return sys.modules["bench_gpu"]
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One smoke run of the whole matrix (both tiny models), writing its table into a docs file
    that already has a marked section between hand-written text."""
    gpu = _gpu_module()
    docs = tmp_path_factory.mktemp("docs") / "performance.md"
    docs.write_text(BEFORE + gpu.START + "\nold results\n" + gpu.END + AFTER, encoding="utf-8")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--write-docs", str(docs)], cwd=REPO,
                          env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    return done, docs


def test_smoke_runs_the_matrix_and_prints_ratios(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, _ = smoke
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    # SD1.5 with SDPA, eager, normal memory: both sides measured, the ratio printed, same work done
    row = re.search(r"^ROW SD1\.5 64x64 sdpa compile=no normal batch 1: it/s ours ([\d.]+) diffusers ([\d.]+) "
                    r"ours/diffusers ([\d.]+)", out, re.M)
    assert row, out[-3000:]
    ours, theirs, ratio = map(float, row.groups())
    assert ours > 0 and theirs > 0 and ratio == pytest.approx(ours / theirs, rel=0.02)
    assert re.search(r"^ROW SD1\.5 64x64 sdpa compile=no normal batch 1: .*same-work check", out, re.M)
    assert re.search(r"^ROW SD1\.5 64x64 sdpa compile=no normal batch 4: it/s ours [\d.]+ diffusers [\d.]+", out, re.M)
    # SDXL goes through StableDiffusionXLPipeline the same way
    assert re.search(r"^ROW SDXL 64x64 sdpa compile=no normal batch 1: it/s ours [\d.]+ diffusers [\d.]+ "
                     r"ours/diffusers [\d.]+", out, re.M)
    # memory-mode rows run (diffusers' model offload on the CPU); VRAM is n/a without CUDA
    assert re.search(r"^ROW SD1\.5 64x64 sdpa compile=no medvram batch 1: it/s ours [\d.]+ diffusers [\d.]+ "
                     r"ours/diffusers [\d.]+ \| peak VRAM GiB ours n/a", out, re.M)
    assert re.search(r"^ROW SD1\.5 64x64 sdpa compile=no lowvram batch 1: .*diffusers skipped: "
                     r"enable_sequential_cpu_offload\(\) needs an accelerator", out, re.M)
    # an unavailable backend is a skipped row with its reason, not a crash
    assert re.search(r"^ROW SD1\.5 64x64 xformers compile=no normal batch 1: .*skipped: xformers requested", out, re.M)
    # compile rows: measured when Config has the field, else skipped with the reason
    compiled = re.search(r"^ROW SD1\.5 64x64 sdpa compile=yes normal batch 1: (.*)$", out, re.M)
    assert compiled, out[-3000:]
    measured = re.match(r"it/s ours [\d.]+ diffusers [\d.]+", compiled.group(1))
    assert measured or "no `compile` field" in compiled.group(1)
    assert "FAILED" not in out
    assert "== summary" in out


def test_smoke_replaces_only_the_marked_docs_section(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, docs = smoke
    assert done.returncode == 0
    gpu = _gpu_module()
    text = docs.read_text(encoding="utf-8")
    assert text.startswith(BEFORE + gpu.START) and text.endswith(gpu.END + AFTER)
    assert "old results" not in text
    assert text.count(gpu.START) == 1 and text.count(gpu.END) == 1
    section = text[len(BEFORE):-len(AFTER)]
    assert "Smoke run" in section and "torch " in section and "diffusers " in section and "xformers " in section
    assert "| model | size | attention |" in section
    row = r"^\| SD1\.5 \| 64x64 \| sdpa \| no \| normal \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|"
    assert re.search(row, section, re.M)


def test_without_cuda_there_is_nothing_to_measure() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "no CUDA device: nothing to measure"


def test_replace_section_appends_without_markers_and_keeps_the_rest() -> None:
    gpu = _gpu_module()
    section = f"{gpu.START}\nnew\n{gpu.END}"
    assert gpu.replace_section("", section) == section + "\n"
    assert gpu.replace_section("# Title\n", section) == "# Title\n\n" + section + "\n"
    assert gpu.replace_section("# Title", section) == "# Title\n\n" + section + "\n"
    marked = f"top\n{gpu.START}\nold\n{gpu.END}\nbottom\n"
    assert gpu.replace_section(marked, section) == f"top\n{section}\nbottom\n"
    # an end marker before the start marker is not a section: append, keep everything
    odd = f"{gpu.END}\n{gpu.START}\n"
    assert gpu.replace_section(odd, section) == odd + "\n" + section + "\n"


def test_write_docs_creates_the_file(tmp_path: Path) -> None:
    gpu = _gpu_module()
    target = tmp_path / "docs" / "performance.md"
    gpu.write_docs(target, f"{gpu.START}\nx\n{gpu.END}")
    gpu.write_docs(target, f"{gpu.START}\ny\n{gpu.END}")
    assert target.read_text(encoding="utf-8") == f"{gpu.START}\ny\n{gpu.END}\n"


def test_missing_full_size_family_is_a_reason_not_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = _gpu_module()
    monkeypatch.setattr(gpu, "CKPT_DIR", tmp_path)
    monkeypatch.setattr(gpu, "full_size_families", lambda: ("sd1",))
    reason = gpu.ensure_checkpoint(gpu.MODELS["sdxl"])
    assert isinstance(reason, str) and "full-size 'sdxl'" in reason and "--sdxl-checkpoint" in reason
    assert not any(tmp_path.iterdir())


def test_plan_runs_each_configuration_once() -> None:
    gpu = _gpu_module()
    groups = gpu.plan(["sd15"], ["speed", "vram"], ["sdpa", "xformers"], ["normal", "medvram", "lowvram"],
                      compile_rows=True)
    labels = [g.label() for g in groups]
    assert labels == ["sd15 sdpa eager normal", "sd15 sdpa compile normal", "sd15 xformers eager normal",
                      "sd15 xformers compile normal", "sd15 sdpa eager medvram", "sd15 sdpa eager lowvram"]
