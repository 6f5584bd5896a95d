"""`python -m trainer memory`: the peak GPU memory a run needs, per phase, measured without a GPU.

The full-size architecture (random weights) goes through the engine's real set-up and a few real training
steps, a sample and a save on the CPU, in the run's precision, while `DeviceMemory` (a TorchDispatchMode)
counts the bytes of the tensors that would sit on the GPU:
- every storage an operation creates while counting (activations, gradients, optimizer state, casts,
  quantised weights, autograd's saved tensors), until it is freed, unless the loop parks it on the host
  (cached latents and text-encoder outputs);
- the weights of the modules the loop put on the device (trainer/placement.py is where it says so).
The model's build and the batch inputs are not counted (they are on the host, or a few MB).

Where the CPU would hold other dtypes or buffers than CUDA, the count follows CUDA:
- autocast casts as CUDA's autocast does (fp32 norms and softmax, bf16 matmuls), its policy read from torch's own
  AutocastCUDA kernels (trainer/measure/cuda_autocast.py);
- bitsandbytes' nf4 matmul holds the weight it dequantises while it runs, as its CUDA kernel does (`inside_op`).

A CUDA run needs more than its tensors; those terms are added explicitly (constants in trainer/recipe/estimate.py):
- CUDA_CONTEXT_GB (0.4): the CUDA context, cuBLAS / cuDNN handles and kernels, outside torch's allocator:
  about 300-500 MB on current drivers with lazy module loading;
- CUBLAS_WORKSPACE_GB (0.024): cuBLAS and cuBLASLt workspaces, in the allocator but made by no op;
- ALLOCATOR_SLACK (8%): the caching allocator's block rounding and fragmentation, as a share of the peak;
- attention workspace: none added; PyTorch's SDPA on the CPU runs a flash kernel that allocates what the CUDA
  flash kernel does (output and log-sum-exp), and those are counted.
These two constants are assumptions until a GPU run sets `torch.cuda.max_memory_allocated` beside the count.
"""
from __future__ import annotations

import platform
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer import placement
from trainer.measure import ARCHITECTURES, arch_of, family_of
from trainer.measure.cuda_autocast import CudaAutocast
from trainer.recipe.estimate import (ALLOCATOR_SLACK, CUBLAS_WORKSPACE_GB, CUDA_CONTEXT_GB, GB,  # noqa: F401 (one owner)
                                     with_cuda_terms)

# what a table of counts says of itself: rows counted before these rules were in do not say it
COUNTED_AS = "CUDA's autocast casts"
PHASES = ("load", "cache latents", "cache text encoders", "forward", "backward", "optimizer", "validate",
          "sample", "save")


class DeviceMemory(TorchDispatchMode):
    """Live bytes that would be on the training device, with the peak of each phase."""

    def __init__(self, say=None):
        super().__init__()
        self.say = say  # callable(str): each phase's first entry, for long CPU runs
        self.t0 = time.time()
        self.created: dict[int, int] = {}  # storage address -> bytes, for storages made while counting
        self.host: set[int] = set()  # addresses parked on the host
        self.modules: dict[int, torch.nn.Module] = {}  # modules on the device
        self.resident: dict[int, int] = {}  # their tensors' storages
        self.resident_bytes = 0
        self.extra = 0  # created storages that are neither a resident module's nor parked
        self.current = "load"
        self.peaks: dict[str, int] = {}
        self._finalizers: list = []
        self.host_side = False  # set by placement.host_side(): storages made now are in host memory

    # ------------------------------------------------------------------ what the loop says
    def phase(self, name: str) -> None:
        self._resident()  # modules change inside a phase (LoRA injected, weights quantised)
        if self.say and name not in self.peaks:
            self.say(f"  ... {name} ({time.time() - self.t0:.0f} s)")
        self.current = name
        self._peak()

    def placed(self, x, on_device: bool) -> None:
        if isinstance(x, torch.nn.Module):
            if on_device:
                self.modules[id(x)] = x
            else:
                self.modules.pop(id(x), None)
        for t in (_tensors(x) if isinstance(x, torch.nn.Module) else [x]):
            ptr = t.untyped_storage().data_ptr()
            if on_device:
                self.host.discard(ptr)
            else:
                self.host.add(ptr)
        self._resident()
        self._peak()

    # ------------------------------------------------------------------ counting
    def _resident(self) -> None:
        self.resident = {}
        for m in self.modules.values():
            for t in _tensors(m):
                st = t.untyped_storage()
                self.resident[st.data_ptr()] = st.nbytes()
        self.resident_bytes = sum(self.resident.values())
        self.extra = sum(n for p, n in self.created.items() if p not in self.resident and p not in self.host)

    def _counted(self, ptr: int) -> bool:
        return ptr not in self.resident and ptr not in self.host

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if not ptr or ptr in self.created:
            return
        n = st.nbytes()
        self.created[ptr] = n
        self._finalizers.append(weakref.finalize(st, self._free, ptr, n))
        if self.host_side:
            self.host.add(ptr)
        if self._counted(ptr):
            self.extra += n

    def _free(self, ptr: int, n: int) -> None:
        if self.created.get(ptr) != n:
            return
        del self.created[ptr]
        if self._counted(ptr):
            self.extra -= n
        self.host.discard(ptr)

    def _peak(self, inside: int = 0) -> None:
        now = self.resident_bytes + self.extra + inside
        if now > self.peaks.get(self.current, -1):
            self.peaks[self.current] = now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        self._peak(inside_op(func, args))
        return out

    def __enter__(self):
        placement._watchers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        placement._watchers.remove(self)
        for f in self._finalizers:  # a finalizer holds the counter, and the counter the modules: let both go
            f.detach()
        self._finalizers, self.modules, self.created = [], {}, {}
        return super().__exit__(*exc)


def inside_op(func, args) -> int:
    """Bytes an op holds while it runs, beyond its inputs and outputs, where CUDA's kernel differs from the CPU's
    and the difference is big: bitsandbytes' nf4 matmul (`bitsandbytes::gemm_4bit`). On CUDA it dequantises the
    weight into a buffer of the input's dtype and runs F.linear for more than a few rows (bitsandbytes 0.50,
    backends/cuda/ops.py: past 1536 rows on every card, and from 5 rows on most), which the CPU kernel does not
    show; training batches always have more rows. (Its backward dequantises through a separate op: counted.)"""
    if getattr(func, "_schema", None) is None or func._schema.name != "bitsandbytes::gemm_4bit":
        return 0
    a, shape = args[0], args[2]
    if a.numel() // a.shape[-1] <= 4:
        return 0
    return int(shape[0]) * int(shape[1]) * a.element_size()


def _tensors(m: torch.nn.Module):
    yield from m.parameters()
    yield from m.buffers()


# ---------------------------------------------------------------------------------------------- a measurement
def measured_config(cfg):
    """The config as `measure` runs it: one sample prompt of 2 denoising steps at the end, no validation or
    class images, nothing saved or sampled in between (what the estimate of a measured row is of)."""
    return cfg.replace(save_every_steps=0, sample_every_steps=0, validation_split=0.0, validation_dataset="",
                       reg_dataset="", sample_prompts=["zwx, a photo"], sample_steps=2, log_every_steps=1,
                       cache_latents_to_disk=False, tensorboard=False)


def measure(cfg, model, steps: int = 2, work: Path | None = None, say=None) -> dict:
    """Run the real set-up, `steps` steps, one sample and the final save of `cfg` on `model` (random weights)
    while counting. Returns {"phases": {phase: bytes}, "peak_bytes", "peak_phase", "lora_params", ...}."""
    from trainer.engine.loop import train
    from trainer.engine.setup import fresh_accelerate_state
    from trainer.measure.bench import synthetic_dataset

    work = Path(work or tempfile.mkdtemp(prefix="lora_memory_"))
    data = synthetic_dataset(work / "data", max(2, cfg.batch_size * 2), cfg.resolution)
    cfg = measured_config(cfg).replace(dataset=str(data), output_dir=str(work / "run"), max_steps=steps)
    fresh_accelerate_state()
    t0 = time.time()
    counter = DeviceMemory(say)
    seen = {}
    cuda_casts = CudaAutocast()  # autocast casts what CUDA's would (trainer/measure/cuda_autocast.py)
    with counter, cuda_casts:
        train(cfg, work / "run", echo=lambda m: None, model=model, on_setup=lambda r: seen.setdefault("runs", []).append(r))
    run = seen["runs"][0]
    from trainer.models import lora

    lora_params = sum(p.numel() for r in seen["runs"] for m in [r.model.unet, *r.model.text_encoders]
                      for p in lora.lora_parameters(m))  # a sweep: every variant's network
    phases = {p: counter.peaks[p] for p in PHASES if p in counter.peaks}
    top = max(phases, key=phases.get)
    return {"phases": phases, "peak_bytes": phases[top], "peak_phase": top, "lora_params": lora_params,
            "seconds": time.time() - t0, "device": run.accelerator.device.type,
            "uncast": sorted(cuda_casts.unprobed)}


def describe(r: dict) -> list[str]:
    lines = [f"  {p:<20} {n / GB:7.2f} GB" for p, n in r["phases"].items()]
    lines.append(f"  peak: {r['peak_bytes'] / GB:.2f} GB of tensors ({r['peak_phase']}); on a CUDA card about "
                 f"{with_cuda_terms(r['peak_bytes']):.2f} GB with the allocator's slack ({ALLOCATOR_SLACK:.0%}), "
                 f"the CUDA context ({CUDA_CONTEXT_GB} GB) and cuBLAS' workspaces ({CUBLAS_WORKSPACE_GB * 1024:.0f} MB)")
    if r.get("uncast"):
        lines.append(f"  ops whose CUDA autocast rule could not be read, run as the CPU runs them: {', '.join(r['uncast'])}")
    return lines


def summary(cfg, arch: str, key: str | None = None) -> str:
    """A measured run in one line (BENCHMARKS.md's first column; a test matches presets by it)."""
    return (f"{arch} {cfg.resolution}px b{cfg.batch_size} {cfg.mixed_precision}, rank {cfg.rank}, {cfg.optimizer}, "
            f"base {cfg.base_quantization}, ckpt {'on' if cfg.gradient_checkpointing else 'off'}, TE "
            f"{'trained' if cfg.train_text_encoder else ('cached' if cfg.caches_text else 'frozen')}"
            + (", VAE bf16" if cfg.vae_precision == "bf16" else "")
            + (f", sweep of {len(cfg.variants)}" if cfg.variants else "") + (f" ({key})" if key else ""))


def config_for(args):
    from trainer.recipe.config import TrainConfig
    from trainer.recipe.presets import find_preset

    if args.config:
        cfg = TrainConfig.load(args.config)
    elif args.preset:
        cfg = find_preset(args.preset).apply(TrainConfig(), True)
    else:
        cfg = TrainConfig(mixed_precision="bf16", optimizer="adamw8bit")
    changes = {"base_model": "(random weights, full size)", "device": "cpu"}
    if args.resolution:
        changes["resolution"] = args.resolution
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.quantization:
        changes["base_quantization"] = args.quantization
    if getattr(args, "sweep", 0):
        changes["variants"] = [{"name": f"lr{i + 1}", "unet_lr": cfg.unet_lr * (i + 1)} for i in range(args.sweep)]
    cfg = cfg.replace(**changes)
    if cfg.bucket_range[1] < cfg.resolution or cfg.bucket_range[0] > cfg.resolution:
        cfg = cfg.replace(min_bucket=0, max_bucket=0)
    return cfg


def architecture(args) -> str:
    """The full-size architecture one measurement runs on: --model when given, else the preset's family's (an SDXL
    preset on SDXL), else SD 1.5. A preset is never counted on another family's architecture."""
    own = None
    if args.preset:
        from trainer.recipe.presets import find_preset

        family = find_preset(args.preset).family
        own = arch_of(family) if family != "any" else None
    if args.model and own and args.model not in ("tiny", own):
        raise SystemExit(f"error: {args.preset} is a preset for {own}, not {args.model}: count it with --model {own}, "
                         "or leave --model out.")
    return args.model or own or "sd15"


def measure_preset(key: str | None, arch: str, steps: int, resolution=None, batch_size=None, quantization=None,
                   config=None, sweep: int = 0) -> tuple[str, dict, dict]:
    """One measurement: (settings line, measure()'s result, the estimate), printed as it goes."""
    import argparse

    from trainer.measure.bench import build_model
    from trainer.recipe.estimate import estimate_vram_gb

    args = argparse.Namespace(preset=key, config=config, resolution=resolution, batch_size=batch_size,
                              quantization=quantization, sweep=sweep)
    cfg = config_for(args)
    torch.manual_seed(0)
    model = build_model(arch, "cpu", torch.float32)
    print(f"{key or arch}: counting...", flush=True)
    r = measure(cfg, model, steps, say=lambda m: print(m, flush=True))
    what = summary(cfg, arch, key)
    est = estimate_vram_gb(measured_config(cfg), family_of(arch))
    print(what)
    print("\n".join(describe(r)))
    print(f"  estimate (trainer/recipe/estimate.py): {est['total_gb']} GB; LoRA parameters {r['lora_params'] / 1e6:.2f} M "
          f"(estimate {est['lora_params_m']} M); measured in {r['seconds']:.0f} s", flush=True)
    return what, r, est


def _child(job, conn) -> None:
    conn.send(measure_preset(*job))
    conn.close()


def run_memory(args) -> int:
    from trainer.recipe.presets import list_presets

    if getattr(args, "cuda_check", False):
        from trainer.measure.cuda_check import run_cuda_check

        return run_cuda_check(args)

    if args.preset and (args.preset == "all" or "," in args.preset):
        # several presets, each on its family's architecture and in a fresh process (a full-size SDXL build
        # after others would not fit in this machine's memory)
        import multiprocessing

        wanted = None if args.preset == "all" else set(args.preset.split(","))
        jobs = [(p.key, arch_of(p.family), args.steps) for p in list_presets(None)
                if p.shipped and (wanted is None or p.key in wanted)]
        ctx = multiprocessing.get_context("spawn")
        rows = []
        for job in jobs:  # not a Pool: its workers are daemons, and a run's data loader starts processes
            here, there = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(job, there))
            proc.start()
            there.close()
            try:
                rows.append(here.recv())
            except EOFError:
                raise SystemExit(f"error: measuring {job[0]} ended without a result (out of memory?)") from None
            proc.join()
    else:
        rows = [measure_preset(args.preset, architecture(args), args.steps, args.resolution, args.batch_size,
                               args.quantization, args.config, args.sweep)]
    table = table_of(rows)
    print(table)
    if args.out:
        record(Path(args.out), table)
    return 0


def record(path: Path, table: str) -> None:
    """Append a table of measurements to a file (BENCHMARKS.md when asked with --out)."""
    from trainer.fsutil import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    atomic_write_text(path, text.rstrip() + "\n" + table + "\n")


def table_of(rows: list) -> str:
    """A table of measurements, with the machine and versions (BENCHMARKS.md's form)."""
    import diffusers
    import peft

    machine = f"{platform.machine()}, {torch.get_num_threads()} CPU threads, no GPU"
    lines = [f"\n### `trainer memory` ({time.strftime('%Y-%m-%d')}; {machine}; torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}, peft {peft.__version__})",
             f"Projected (counted on the CPU, {COUNTED_AS}): GB of tensors that would sit on the GPU, per phase; "
             f"*CUDA* adds {ALLOCATOR_SLACK:.0%} allocator slack, {CUDA_CONTEXT_GB} GB of context and "
             f"{CUBLAS_WORKSPACE_GB * 1024:.0f} MB of cuBLAS workspaces (trainer/measure/memory.py); "
             "*estimate* is what the pre-flight check says (trainer/recipe/estimate.py).", "",
             "| run | " + " | ".join(PHASES) + " | peak | CUDA | estimate |", "|---|" + "---|" * (len(PHASES) + 3)]
    for what, r, est in rows:
        lines.append(f"| {what} | " + " | ".join(f"{r['phases'][p] / GB:.2f}" if p in r["phases"] else "-" for p in PHASES)
                     + f" | {r['peak_bytes'] / GB:.2f} | {with_cuda_terms(r['peak_bytes']):.2f} | {est['total_gb']} |")
    return "\n".join(lines)


def add_command(sub) -> None:
    m = sub.add_parser("memory", help="peak GPU memory per phase of a run, counted on the CPU (no GPU needed)")
    m.add_argument("--model", choices=["tiny", *ARCHITECTURES],
                   help="full-size architecture with random weights (tiny: the test model); default: the preset's "
                        "family's, else sd15")
    m.add_argument("--preset", help="a preset's key (e.g. sdxl_lowvram), several keys with commas, or 'all' for every shipped preset")
    m.add_argument("--config", help="a TrainConfig TOML instead of a preset")
    m.add_argument("--resolution", type=int)
    m.add_argument("--batch-size", type=int)
    m.add_argument("--quantization", choices=["none", "fp8", "int8", "nf4"], help="override base_quantization")
    m.add_argument("--steps", type=int, default=2, help="training steps to count (the optimizer state appears at the first)")
    m.add_argument("--cuda-check", action="store_true",
                   help="on a CUDA GPU: run the preset with the allocator capped at the card size it promises and "
                        "print what the card used per phase beside the projection (trainer/measure/cuda_check.py)")
    m.add_argument("--card-gb", type=float, help="with --cuda-check: the card size to cap at (default: the preset's)")
    m.add_argument("--sweep", type=int, default=0, metavar="K",
                   help="count a sweep of K variants of the config (the same network at K learning rates) in one run")
    m.add_argument("--out", default="", help="also append the table to this file (e.g. BENCHMARKS.md); default: print only")
    m.set_defaults(fn=run_memory)
