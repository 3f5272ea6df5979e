"""Timing of load, prefill and decode, in the manner of llama-bench; returns data, never prints.

For every combination of prompt length, decode length, batch size, dtype and quantization:

- load the model (once per dtype/quant pair; its load time goes into each of its rows);
- build random prompt ids `[batch, n_prompt]` from a seeded generator;
- per repetition, allocate a fresh cache for `n_prompt + n_gen` positions (not timed), then time
  *prefill*: one forward over the prompt with `last_only=True` and the argmax of its logits
  (= time to first token), and *decode*: `n_gen` single-token steps over that cache, each
  feeding the argmax of the previous logits. EOS is never checked, so every run has the same
  length;
- one uncounted warm-up repetition first (a `--compile` step compiles there), then
  `repetitions` counted ones, reported as mean and sample standard deviation.

Decode bandwidth is an estimate of the bytes a decode step must read, times steps per second:
every parameter and buffer of the model once (whatever their dtype, so int8 weights and their
scales count at their stored size), except the lookup-only tables (an untied token embedding,
GPT-2's learned positions), of which a step reads one row; plus the key/value cache rows that
attention reads, averaged over the steps. Activations are ignored, and a CPU's caches may serve
some reads of a small model, so the figure is the traffic the weights call for, not a reading of
a hardware counter.
"""

from __future__ import annotations

import gc
import itertools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .loader import load_model, pick_device, pick_dtype
from .model import GPT, KVCache

#: (ids [B, 1], absolute position, cache) -> logits [B, 1, vocab]
Step = Callable[[torch.Tensor, int, KVCache], torch.Tensor]
#: progress(done, total, what): called after every timed or warm-up repetition.
Progress = Callable[[int, int, str], None]

#: Parameters a decode step reads one row of, not the whole matrix.
LOOKUP_ONLY = ("tok_emb", "pos_emb")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Each tuple may hold several values; every combination is one row."""

    model_dir: Path
    n_prompt: tuple[int, ...] = (128,)
    n_gen: tuple[int, ...] = (128,)
    batch: tuple[int, ...] = (1,)
    dtype: tuple[str, ...] = ("auto",)
    quant: tuple[str, ...] = ("none",)
    repetitions: int = 5
    device: str = "auto"
    threads: int | None = None  # None: leave torch's default
    compile: bool = False
    seed: int = 0

    def cases(self) -> list[tuple[str, str, int, int, int]]:
        """(dtype, quant, batch, n_prompt, n_gen) in run order: the model-level options
        outermost, so each model is loaded (and compiled) once."""
        return list(
            itertools.product(self.dtype, self.quant, self.batch, self.n_prompt, self.n_gen)
        )


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch: str
    threads: int
    device: str  # "cpu", or the GPU's name

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores · torch {self.torch} · {self.threads} threads "
            f"· device {self.device}"
        )


@dataclass
class BenchRow:
    """One measured combination. Rates are means over the repetitions; `*_std` their sample
    standard deviation (0 with one repetition)."""

    model: str
    family: str
    params: int
    device: str
    dtype: str
    quant: str
    compile: bool
    batch: int
    n_prompt: int
    n_gen: int
    prompt_tokens: int  # n_prompt * batch, per repetition
    gen_tokens: int  # n_gen * batch, per repetition
    repetitions: int
    load_s: float
    prefill_tok_s: float
    prefill_tok_s_std: float
    decode_tok_s: float
    decode_tok_s_std: float
    ttft_ms: float
    ttft_ms_std: float
    peak_mem_mb: float
    weights_mb: float  # bytes read per decode step for the weights
    kv_read_mb: float  # mean bytes of cache read per decode step
    decode_gb_s: float
    cpu: str
    cores: int
    torch: str
    threads: int
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def machine(self) -> Machine:
        return Machine(self.cpu, self.cores, self.torch, self.threads, self.device)

    def record(self) -> dict[str, object]:
        """The documented fields, without the raw samples (for JSON, CSV and tables)."""
        data = asdict(self)
        data.pop("samples")
        return data


def row_fields() -> list[str]:
    return [f.name for f in fields(BenchRow) if f.name != "samples"]


@dataclass
class Timing:
    prefill_s: float
    ttft_s: float
    decode_s: float


def machine_info(device: torch.device) -> Machine:
    name = device.type
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    return Machine(
        cpu=cpu_name(),
        cores=os.cpu_count() or 1,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=name,
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def eager_step(model: GPT) -> Step:
    def step(ids: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        return model(ids, start=position, cache=cache, last_only=True)

    return step


def compile_step(model: GPT) -> Step:
    """The single-token decode step under `torch.compile`; prefill stays eager.

    The position is a Python int: dynamo specialises on its first value and, on the second,
    recompiles with it symbolic, so the warm-up repetition absorbs both compilations.
    `GPT.forward` enters inference mode, which inductor (torch 2.13) cannot trace ("Cannot set
    version_counter for inference tensor"), so the undecorated function is compiled and must
    be called under `torch.no_grad()`.
    """
    forward = getattr(type(model).forward, "__wrapped__", type(model).forward)

    def step(ids: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        return forward(model, ids, start=position, cache=cache, last_only=True)

    return torch.compile(step)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(model: GPT, step: Step, prompt: torch.Tensor, n_gen: int) -> Timing:
    """One repetition: prefill the prompt `[B, T]`, then `n_gen` greedy single-token steps."""
    device = prompt.device
    batch, n_prompt = prompt.shape
    cache = model.new_cache(batch, n_prompt + n_gen)
    # no_grad rather than inference_mode: a compiled step must not run in inference mode.
    with torch.no_grad():
        sync(device)
        started = time.perf_counter()
        logits = model(prompt, start=0, cache=cache, last_only=True)
        sync(device)
        prefilled = time.perf_counter()
        token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        sync(device)
        first = time.perf_counter()
        for i in range(n_gen):
            # Greedy and EOS-blind: the argmax stays on the device, no per-step transfer.
            token = step(token, n_prompt + i, cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        done = time.perf_counter()
    return Timing(prefilled - started, first - started, done - first)


def weight_bytes(model: GPT) -> int:
    """Bytes of every parameter and buffer a decode step reads whole (see the module doc)."""
    total = 0
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in LOOKUP_ONLY:
            total += tensor[0].numel() * tensor.element_size()  # one row per token
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def kv_read_bytes(model: GPT, batch: int, n_prompt: int, n_gen: int) -> float:
    """Mean bytes of keys and values read per decode step (step i attends n_prompt + i + 1)."""
    c = model.config
    itemsize = model.new_cache(1, 1).k.element_size()  # what the cache really stores
    per_position = 2 * c.n_layer * batch * c.n_kv_head * c.head_dim * itemsize
    return per_position * (n_prompt + (n_gen + 1) / 2)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident size (VmHWM) to its current size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's lifetime maximum


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes vs KiB


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def load(
    model_dir: Path, dtype: torch.dtype, device: torch.device, quant: str
) -> tuple[GPT, float, int]:
    """The model ready to run, its load time in seconds (quantization included), and its
    parameter count (counted before quantization, which may turn weights into buffers)."""
    sync(device)
    started = time.perf_counter()
    model = load_model(model_dir, dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    if quant == "int8":
        from .quant import quantize_int8

        model = quantize_int8(model)
    sync(device)
    return model, time.perf_counter() - started, n_params


def run_bench(config: BenchConfig, progress: Progress | None = None) -> list[BenchRow]:
    """Measure every combination in `config`; one row each, in `config.cases()` order.

    Values are not validated here beyond what the loader checks (the CLI does that first).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    machine = machine_info(device)
    cases = config.cases()
    total = len(cases) * (config.repetitions + 1)
    done = 0
    rows: list[BenchRow] = []
    loaded: tuple[str, str] | None = None
    model: GPT | None = None
    step: Step | None = None
    load_s, n_params = 0.0, 0

    for dtype_name, quant, batch, n_prompt, n_gen in cases:
        dtype = pick_dtype(dtype_name, device)
        if loaded != (dtype_name, quant):
            model = step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if config.compile:
                torch._dynamo.reset()  # compiled code of the previous model is dead weight
            model, load_s, n_params = load(config.model_dir, dtype, device, quant)
            step = compile_step(model) if config.compile else eager_step(model)
            loaded = (dtype_name, quant)
        assert model is not None and step is not None

        generator = torch.Generator().manual_seed(config.seed)
        prompt = torch.randint(
            0, model.config.vocab_size, (batch, n_prompt), generator=generator
        ).to(device)
        what = f"{str(dtype).removeprefix('torch.')} {quant} b{batch} p{n_prompt} n{n_gen}"
        reset_peak_memory(device)
        timings = []
        for rep in range(config.repetitions + 1):
            timing = time_once(model, step, prompt, n_gen)
            if rep > 0:  # the first is the warm-up
                timings.append(timing)
            done += 1
            if progress is not None:
                progress(done, total, what)

        prefill = [batch * n_prompt / t.prefill_s for t in timings]
        decode = [batch * n_gen / t.decode_s for t in timings]
        ttft = [t.ttft_s * 1e3 for t in timings]
        steps_per_s = [n_gen / t.decode_s for t in timings]
        weights, kv = weight_bytes(model), kv_read_bytes(model, batch, n_prompt, n_gen)
        prefill_mean, prefill_std = _mean_std(prefill)
        decode_mean, decode_std = _mean_std(decode)
        ttft_mean, ttft_std = _mean_std(ttft)
        rows.append(
            BenchRow(
                model=str(config.model_dir),
                family=model.config.family,
                params=n_params,
                device=machine.device,
                dtype=str(dtype).removeprefix("torch."),
                quant=quant,
                compile=config.compile,
                batch=batch,
                n_prompt=n_prompt,
                n_gen=n_gen,
                prompt_tokens=batch * n_prompt,
                gen_tokens=batch * n_gen,
                repetitions=config.repetitions,
                load_s=load_s,
                prefill_tok_s=prefill_mean,
                prefill_tok_s_std=prefill_std,
                decode_tok_s=decode_mean,
                decode_tok_s_std=decode_std,
                ttft_ms=ttft_mean,
                ttft_ms_std=ttft_std,
                peak_mem_mb=peak_memory_mb(device),
                weights_mb=weights / 1e6,
                kv_read_mb=kv / 1e6,
                decode_gb_s=(weights + kv) * statistics.fmean(steps_per_s) / 1e9,
                cpu=machine.cpu,
                cores=machine.cores,
                torch=machine.torch,
                threads=machine.threads,
                samples={
                    "prefill_s": [t.prefill_s for t in timings],
                    "ttft_s": [t.ttft_s for t in timings],
                    "decode_s": [t.decode_s for t in timings],
                },
            )
        )
    return rows
