"""gptcli side by side with HF transformers and llama.cpp, in one process (`make bench-compare`).

    python -m benchmarks.compare [-r 3] [--models smollm2,gpt2] [--engines ...] [--markdown]

Every engine gets the same model, the same random prompt of `-p` token ids and makes `-n` new
tokens greedily with EOS ignored. Engines take turns repetition by repetition (the starting
engine rotates), so a slow spell of a shared machine hits them all alike; one uncounted warm-up
round comes first (gptcli's `--compile` compiles there).

What is timed, per engine:

- prefill: from the call to the first token chosen (the prompt forward, logits for its last
  position, the argmax), i.e. time to first token; prefill tok/s = p / that time;
- decode: the remaining n - 1 tokens, one single-token forward each over the engine's cache;
  decode tok/s = (n - 1) / that time.

| engine | how |
|---|---|
| `gptcli` | `load_model` + a cache for p + n, as `gptcli bench` times it (`gptcli.bench.time_once`) |
| `gptcli-int8` | the same after `gptcli.quant.quantize_int8` (skipped while that is unavailable) |
| `hf` | `AutoModelForCausalLM.from_pretrained(folder, dtype=float32).generate(...)` with `do_sample=False`, `min_new_tokens = max_new_tokens = n`; a logits processor notes the time of its first call, which splits prefill from decode inside the one `generate` call |
| `llama.cpp-f32`, `llama.cpp-q8_0` | `llama_cpp.Llama` on GGUF files written from the same folder by `benchmarks/gguf_writer.py` (cached in weights/.cache/gguf/); `eval(prompt)`, then `eval([token])` per step, argmax of the last logits; skipped when `llama_cpp` is not importable |

Ratios are gptcli's tokens/s over the other engine's: `gptcli-int8` for the Q8_0 row (when it
ran), plain `gptcli` for the others.

Models: `smollm2` (weights/smollm2-135m-instruct, from `make weights`) and `gpt2`, a GPT-2
124M-shaped checkpoint with random weights (speed does not depend on the values), made once in
weights/.cache/gpt2-124m-random with transformers and the GPT-2 tokenizer files of
tests/fixtures/gpt2-bpe.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.gguf_writer import cached_gguf

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "weights" / ".cache"
ENGINES = ("gptcli", "gptcli-int8", "hf", "llama.cpp-f32", "llama.cpp-q8_0")


class Skip(Exception):
    """An engine or model that cannot run here; the message says why."""


def smollm2() -> Path:
    path = ROOT / "weights" / "smollm2-135m-instruct"
    if not (path / "config.json").is_file():
        raise Skip(f"{path} is missing; run `make weights`")
    return path


def gpt2_random() -> Path:
    """A GPT-2 124M-shaped checkpoint (GPT2Config's defaults), random weights, made once."""
    path = CACHE / "gpt2-124m-random"
    if (path / "model.safetensors").is_file():
        return path
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(4)}")
    try:
        model.save_pretrained(tmp)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(ROOT / "tests" / "fixtures" / "gpt2-bpe" / name, tmp / name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


MODELS: dict[str, Callable[[], Path]] = {"smollm2": smollm2, "gpt2": gpt2_random}


@dataclass
class Result:
    engine: str
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


class Engine:
    name = ""

    def run(self, ids: list[int], n_new: int) -> tuple[float, float]:
        """(seconds to the first token, seconds for the n_new - 1 tokens after it)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Gptcli(Engine):
    def __init__(self, folder: Path, quant: bool, compile_step: bool) -> None:
        from gptcli import bench
        from gptcli.loader import load_model

        self.name = "gptcli-int8" if quant else "gptcli"
        self.bench = bench
        self.model = load_model(folder, torch.float32, torch.device("cpu"))
        if quant:
            from gptcli.errors import GptcliError
            from gptcli.quant import quantize_int8

            try:
                self.model = quantize_int8(self.model)
            except GptcliError as e:
                raise Skip(str(e)) from None
        step = bench.compile_step if compile_step else bench.eager_step
        self.step = step(self.model)

    def run(self, ids: list[int], n_new: int) -> tuple[float, float]:
        timing = self.bench.time_once(self.model, self.step, torch.tensor([ids]), n_new - 1)
        return timing.ttft_s, timing.decode_s


class Transformers(Engine):
    name = "hf"

    def __init__(self, folder: Path) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32
        ).eval()
        config = self.model.config
        eos = config.eos_token_id if config.eos_token_id is not None else 0
        self.eos = eos[0] if isinstance(eos, list) else eos
        self.transformers = transformers

    def run(self, ids: list[int], n_new: int) -> tuple[float, float]:
        tf = self.transformers
        first: list[float] = []

        class FirstCall(tf.LogitsProcessor):
            # generate calls processors right after each forward: the first call ends prefill
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if not first:
                    first.append(time.perf_counter())
                return scores

        config = tf.GenerationConfig(
            max_new_tokens=n_new,
            min_new_tokens=n_new,  # EOS masked out: every run makes n_new tokens
            do_sample=False,
            eos_token_id=self.eos,
            pad_token_id=self.eos,
        )
        prompt = torch.tensor([ids])
        started = time.perf_counter()
        out = self.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=config,
            logits_processor=tf.LogitsProcessorList([FirstCall()]),
        )
        done = time.perf_counter()
        if out.shape[1] != len(ids) + n_new:
            raise RuntimeError(f"transformers made {out.shape[1] - len(ids)} tokens, not {n_new}")
        # The first token is chosen right after the processor call; the argmax is negligible.
        return first[0] - started, done - first[0]


class LlamaCpp(Engine):
    def __init__(self, folder: Path, qtype: str, threads: int, n_ctx: int) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise Skip("llama_cpp is not importable (pip install llama-cpp-python)") from None
        import numpy as np

        self.np = np
        self.name = f"llama.cpp-{qtype.lower()}"
        path = cached_gguf(folder, qtype, CACHE / "gguf")
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=max(512, n_ctx),  # the whole prompt in one batch, as the other engines do
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )

    def _next(self) -> int:
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def run(self, ids: list[int], n_new: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()  # empties the KV cache (the next eval removes positions >= 0)
        started = time.perf_counter()
        llm.eval(ids)
        token = self._next()
        first = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval([token])
            token = self._next()
        return first - started, time.perf_counter() - first

    def close(self) -> None:
        if hasattr(self.llm, "close"):  # older versions free the model on garbage collection
            self.llm.close()


def make_engine(name: str, folder: Path, threads: int, n_ctx: int, compile_step: bool) -> Engine:
    if name in ("gptcli", "gptcli-int8"):
        return Gptcli(folder, quant=name == "gptcli-int8", compile_step=compile_step)
    if name == "hf":
        return Transformers(folder)
    return LlamaCpp(folder, name.removeprefix("llama.cpp-").upper(), threads, n_ctx)


def measure(
    folder: Path, engines: list[str], args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[list[Result], list[str]]:
    """Load every engine for one model, then alternate them for 1 + r rounds."""
    notes: list[str] = []
    loaded: list[Engine] = []
    n_ctx = args.p + args.n
    for name in engines:
        log(f"  loading {name}")
        try:
            loaded.append(make_engine(name, folder, args.threads, n_ctx, args.compile))
        except Skip as e:
            notes.append(f"{name} skipped: {e}")
            log(f"  {notes[-1]}")
    from gptcli.config import ModelConfig

    vocab = ModelConfig.from_dir(folder).vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.p,), generator=generator).tolist()
    results = {e.name: Result(e.name) for e in loaded}
    for rep in range(args.r + 1):
        shift = rep % max(len(loaded), 1)
        for engine in loaded[shift:] + loaded[:shift]:
            prefill, decode = engine.run(ids, args.n)
            kind = "warm-up" if rep == 0 else f"{rep}/{args.r}"
            log(f"  {kind} {engine.name}: prefill {prefill:.3f}s decode {decode:.3f}s")
            if rep > 0:
                results[engine.name].prefill_s.append(prefill)
                results[engine.name].decode_s.append(decode)
    for engine in loaded:
        engine.close()
    del loaded
    gc.collect()
    return list(results.values()), notes


def rates(seconds: list[float], count: int) -> tuple[float, float]:
    values = [count / s for s in seconds]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(results: list[Result], p: int, n: int) -> tuple[list[str], list[list[str]]]:
    """Header and rows: tokens/s per engine and gptcli's ratio over it."""
    from gptcli.render import number

    means = {r.engine: (rates(r.prefill_s, p)[0], rates(r.decode_s, n - 1)[0]) for r in results}
    header = ["engine", "prefill tok/s", "decode tok/s", "gptcli ÷ prefill", "gptcli ÷ decode"]
    rows = []
    for r in results:
        (pre, pre_sd), (dec, dec_sd) = rates(r.prefill_s, p), rates(r.decode_s, n - 1)
        ours = "gptcli-int8" if r.engine.endswith("q8_0") and "gptcli-int8" in means else "gptcli"
        ratio_p = ratio_d = ""
        if not r.engine.startswith("gptcli") and ours in means:
            ratio_p = f"{means[ours][0] / pre:.2f}× ({ours})"
            ratio_d = f"{means[ours][1] / dec:.2f}× ({ours})"
        rows.append(
            [
                r.engine,
                f"{number(pre)} ± {number(pre_sd)}",
                f"{number(dec)} ± {number(dec_sd)}",
                ratio_p,
                ratio_d,
            ]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def machine(threads: int) -> str:
    from gptcli.bench import cpu_name

    versions = [f"torch {torch.__version__}"]
    for module in ("transformers", "llama_cpp"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {threads} threads, "
        f"{platform.system()} · {', '.join(versions)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="gptcli vs HF transformers vs llama.cpp: prefill and decode tokens/s."
    )
    parser.add_argument("-r", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("-p", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("-n", type=int, default=128, help="new tokens (default 128)")
    parser.add_argument("--models", default="smollm2,gpt2", help="comma-separated: smollm2,gpt2")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's choice")
    parser.add_argument("--compile", action="store_true", help="torch.compile gptcli's step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", action="store_true", help="print the raw timings as JSON")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",")]
    engines = [e.strip() for e in args.engines.split(",")]
    for m in models:
        if m not in MODELS:
            parser.error(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    for e in engines:
        if e not in ENGINES:
            parser.error(f"--engines: unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if args.r < 1 or args.p < 1 or args.n < 2:
        parser.error("-r and -p must be at least 1, -n at least 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report: dict[str, object] = {"machine": machine(args.threads), "p": args.p, "n": args.n}
    sections = []
    for name in models:
        try:
            folder = MODELS[name]()
        except Skip as e:
            sections.append(f"{name}: skipped ({e})")
            continue
        log(f"{name}: {folder}")
        results, notes = measure(folder, engines, args, log)
        report[name] = {
            r.engine: {"prefill_s": r.prefill_s, "decode_s": r.decode_s} for r in results
        }
        header, rows = table(results, args.p, args.n)
        title = f"{name} ({folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder})"
        if args.markdown:
            title = f"**{title}**"
        body = format_table(header, rows, args.markdown)
        notes_block = "\n".join(f"- {note}" for note in notes)
        sections.append("\n\n".join(part for part in (title, body, notes_block) if part))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{report['machine']}\n{args.p} prompt tokens, {args.n} new tokens (greedy, EOS ignored), "
        f"{args.r} repetitions after a warm-up; mean ± standard deviation\n"
    )
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
