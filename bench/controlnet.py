"""What one ControlNet unit costs, against the same job without it, measured in the same run:

  (a) STEP  seconds per Euler step with one ControlNet unit / without one: the same engine, full-size
            SD1.5 architecture at 256x256 in bf16 on the CPU, rounds alternating which side goes
            first (a ControlNet is a second copy of the UNet's encoder: goal <= 1.45)
  (b) LOAD  peak RSS added by loading a full-size ControlNet (original layout, fp16 safetensors) for
            the loaded checkpoint / the file's size, in a fresh process with the checkpoint loaded
            first (RSS sampled every 2 ms while it loads)

The random-weight checkpoint is bench/foundation.py's (bench/.cache/, written on first use); the
ControlNet is written beside it from that checkpoint's UNet on first use.

    python bench/controlnet.py            # about 5 minutes on a 2-core CPU (plus first-use writes)
    python bench/controlnet.py --quick    # tiny model at 64x64: a smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # foundation.py's helpers
sys.path.insert(0, str(HERE.parent))

from foundation import CACHE, ENV, ensure_checkpoint, fmt_bytes, log, step_ours  # noqa: E402

_WRITE_CHILD = r"""
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from webui.models.load import load_bundle
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime
from webui.testing.make_controlnet import controlnet_to_ldm, make_controlnet

runtime = Runtime(torch.device("cpu"), torch.float32, torch.float32)
bundle = load_bundle(Path(sys.argv[1]), runtime=runtime, tokenizers=TokenizerFactory())
state = controlnet_to_ldm(make_controlnet(bundle.unet, strength=0.5, seed=1))
save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, sys.argv[2])
"""

_LOAD_CHILD = r"""
import gc, json, resource, sys, threading, time
from pathlib import Path

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

import torch
from webui.controlnet.models import ControlNetLibrary
from webui.models.hashing import HashCache
from webui.models.load import load_bundle
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

runtime = Runtime(torch.device("cpu"), torch.bfloat16, torch.bfloat16)
bundle = load_bundle(Path(sys.argv[1]), runtime=runtime, tokenizers=TokenizerFactory())
file = Path(sys.argv[2])
library = ControlNetLibrary(file.parent, HashCache(Path(sys.argv[3])))
gc.collect()
before = rss()
peak, done = [before], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

watcher = threading.Thread(target=sample)
watcher.start()
t0 = time.perf_counter()
net = library.load(file.stem, bundle)
load_s = time.perf_counter() - t0
done.set()
watcher.join()
gc.collect()
after = rss()
weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
print(json.dumps(dict(load_s=load_s, before=before, peak=max(peak[0], after), after=after, weights=weights)))
"""


def ensure_controlnet(ckpt: Path, quick: bool, workdir: Path) -> Path:
    folder = (workdir if quick else CACHE) / "ControlNet"
    path = folder / f"control_{ckpt.stem}.safetensors"
    if not path.exists():
        log(f"writing a ControlNet (fp16, random weights) for {ckpt.name} to {path} ...")
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder.parent / f"partial-{path.name}"
        subprocess.run([sys.executable, "-c", _WRITE_CHILD, str(ckpt), str(partial)], env=ENV, check=True)
        partial.replace(path)
    return path


def bench_steps(ckpt: Path, controlnet: Path, size: int, steps: int, rounds: int, workdir: Path) -> float:
    import torch
    from PIL import Image

    from webui.app import build_engine
    from webui.config import Config

    data = workdir / "data"
    (data / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    (data / "models" / "Stable-diffusion" / ckpt.name).symlink_to(ckpt)
    (data / "models" / "ControlNet").mkdir(parents=True, exist_ok=True)
    (data / "models" / "ControlNet" / controlnet.name).symlink_to(controlnet)
    engine = build_engine(Config(data_dir=data, dtype="bfloat16"))
    control = Image.new("RGB", (size, size))
    control.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    unit = {"model": controlnet.stem, "module": "canny", "image": control}
    log(f"\n== STEP: {size}x{size}, {steps} Euler steps, bf16, {torch.get_num_threads()} threads, {rounds} rounds ==")
    step_ours(engine, size, 2)  # warm-up: loads the checkpoint
    step_ours(engine, size, 2, controlnet=[unit])  # and the ControlNet
    plain: list[float] = []
    with_unit: list[float] = []
    for r in range(rounds):
        sides = [(plain, {}), (with_unit, {"controlnet": [unit]})]
        for times, fields in (sides if r % 2 == 0 else sides[::-1]):
            times.extend(step_ours(engine, size, steps, **fields))
    a, b = statistics.median(plain), statistics.median(with_unit)
    log(f"seconds per step without a unit: median {a:.3f} s ({len(plain)} steps)")
    log(f"seconds per step with one unit:  median {b:.3f} s ({len(with_unit)} steps)")
    log(f"STEP: one ControlNet unit / none = {b / a:.2f} (goal <= 1.45)")
    return b / a


def bench_load(ckpt: Path, controlnet: Path, repeats: int, workdir: Path) -> float:
    size = controlnet.stat().st_size
    log(f"\n== LOAD: {controlnet.name} ({fmt_bytes(size)}) for {ckpt.name}, {repeats} fresh process(es) ==")
    runs = []
    for i in range(repeats):
        out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(ckpt), str(controlnet),
                              str(workdir / f"hashes-{i}.json")], env=ENV, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"load child exited with {out.returncode}:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    deltas = [r["peak"] - r["before"] for r in runs]
    delta = statistics.median(deltas)
    last = runs[-1]
    times = ", ".join(f"{r['load_s']:.2f}" for r in runs)
    log(f"load time: {times} s; weights in memory {fmt_bytes(last['weights'])} "
        f"(bf16); RSS after {fmt_bytes(last['after'] - last['before'])} over the checkpoint's")
    log(f"LOAD: peak RSS added / file size = {delta / size:.2f} ({fmt_bytes(delta)} / {fmt_bytes(size)})")
    return delta / size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model at 64x64: a smoke check")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes for the load figure")
    a = ap.parse_args(argv)
    log(f"bench/controlnet.py on {platform.machine()}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = ensure_checkpoint(a.quick, work)
        controlnet = ensure_controlnet(ckpt, a.quick, work)
        step = bench_steps(ckpt, controlnet, 64 if a.quick else 256, a.steps, a.rounds, work)
        load = bench_load(ckpt, controlnet, a.repeats, work)
    log(f"\nSUMMARY: step with one unit / without = {step:.2f} (goal <= 1.45); "
        f"peak RSS added by loading / file size = {load:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
