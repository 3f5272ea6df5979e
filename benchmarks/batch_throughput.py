"""Batched generation (`gptcli batch`) against one `Generation` per prompt, in one process.

64 prompts of about 32 tokens, 64 new tokens each (EOS ignored, so both sides do the same
work), the default model, on the CPU unless --device says otherwise. The sequential side does
what `gptcli generate` does per prompt: a batch-1 prefill, batch-1 decode steps, its own seeded
generator and incremental text decoding. The batched side runs the same requests through
`BatchGenerator`. One short warm-up of each comes first; then the two are timed in turn and the
ratio of their tokens per second printed, with how many rows came out token for token the same.

    .venv/bin/python -m benchmarks.batch_throughput            # sampling, gptcli's defaults
    .venv/bin/python -m benchmarks.batch_throughput --temp 0   # greedy
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from gptcli.batch import BatchGenerator, Line, Request, encode_prompt
from gptcli.generate import Generation
from gptcli.loader import load_model, pick_device
from gptcli.sampling import SamplingParams, make_generator
from gptcli.tokenizer import StreamDecoder, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "weights" / "smollm2-135m-instruct"

TOPICS = [
    "the water cycle", "volcanoes", "the printing press", "honey bees", "black holes",
    "the Roman aqueducts", "photosynthesis", "the stock market", "coral reefs", "vaccines",
    "the internet", "glaciers", "chess openings", "the human heart", "solar panels",
    "migrating birds",
]  # fmt: skip
TEMPLATES = [
    "Write a short paragraph about {topic} for a curious twelve-year-old. Explain what it is, "
    "why it matters, and give one surprising example. Keep it short.",
    "You are a patient teacher. In plain words, describe how {topic} works, then name one common "
    "misunderstanding about it and correct it. Keep it short.",
    "List three facts about {topic} that most people do not know, and for each fact add one "
    "sentence on why it is true. Keep it short.",
    "Imagine a museum exhibit on {topic}. Write the sign that visitors read at the entrance, in "
    "a warm and lively tone, in a few short lines:",
]


def make_prompts() -> list[str]:
    return [t.format(topic=topic) for t in TEMPLATES for topic in TOPICS]


def sequential(model, tokenizer, requests: list[Request]) -> tuple[float, list[list[int]]]:
    """Seconds and ids of one Generation per request, in turn, decoding text as the CLI does."""
    outputs = []
    started = time.perf_counter()
    for request in requests:
        line = request.line
        generator = make_generator(line.seed, str(model.device))
        generation = Generation(
            model, list(request.prompt_ids), line.max_new_tokens, line.params, generator
        )
        decoder = StreamDecoder(tokenizer)
        text = [decoder.push(token) for token in generation]
        text.append(decoder.flush())
        outputs.append(generation.new_ids)
    return time.perf_counter() - started, outputs


def batched(model, tokenizer, requests, batch_size: int) -> tuple[float, list[list[int]], int]:
    """Seconds, ids in input order, and decode steps of one batched run."""
    engine = BatchGenerator(model, tokenizer, batch_size)
    started = time.perf_counter()
    results = {r.request.line.index: list(r.new_ids) for r in engine.run(requests)}
    seconds = time.perf_counter() - started
    return seconds, [results[i] for i in range(len(requests))], engine.decode_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("-n", "--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64, help="how many prompts (at most 64)")
    parser.add_argument(
        "-b", "--batch-size", default="32", help="batch size(s), comma-separated: 8,16,32"
    )
    parser.add_argument("--temp", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = pick_device(args.device)
    model = load_model(args.model, torch.float32, device)
    tokenizer = Tokenizer.from_dir(args.model)
    params = SamplingParams(temperature=args.temp)
    requests = []
    for i, prompt in enumerate(make_prompts()[: args.prompts]):
        ids = encode_prompt(tokenizer, prompt, model.config.bos_token_id)
        line = Line(i, i + 1, i + 1, prompt, args.max_new_tokens, params, i, ())
        requests.append(Request(line, tuple(ids)))
    lengths = [len(r.prompt_ids) for r in requests]
    sizes = [int(size) for size in args.batch_size.split(",")]
    print(
        f"{args.model.name}: {len(requests)} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.1f}), {args.max_new_tokens} new tokens each, "
        f"temp {args.temp}, batch size {args.batch_size}, {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )

    warm = [Request(replace(r.line, max_new_tokens=4), r.prompt_ids) for r in requests[:4]]
    sequential(model, tokenizer, warm)
    batched(model, tokenizer, warm, max(sizes))

    seq_s, seq_ids = sequential(model, tokenizer, requests)
    tokens = sum(len(ids) for ids in seq_ids)
    print(f"one Generation per prompt: {seq_s:7.1f} s  {tokens / seq_s:7.1f} tok/s", flush=True)
    for size in sizes:
        bat_s, bat_ids, steps = batched(model, tokenizer, requests, size)
        tokens_b = sum(len(ids) for ids in bat_ids)
        print(
            f"batched, batch size {size} ({steps} decode steps): {bat_s:7.1f} s  "
            f"{tokens_b / bat_s:7.1f} tok/s"
        )
        same = sum(a == b for a, b in zip(seq_ids, bat_ids, strict=True))
        print(f"  throughput ratio: {(tokens_b / bat_s) / (tokens / seq_s):.1f}x")
        print(f"  rows identical token for token: {same}/{len(requests)}")
        for i, (a, b) in enumerate(zip(seq_ids, bat_ids, strict=True)):
            if a != b:
                first = next(k for k in range(max(len(a), len(b))) if a[k : k + 1] != b[k : k + 1])
                print(f"  prompt {i + 1}: first different token at position {first}")


if __name__ == "__main__":
    main()
