"""Whole-command wall time and peak memory, from the shell: `gptcli generate -n 16 --temp 0`
against the equivalent llama-cpp-python script, and `gptcli --help`.

    .venv/bin/python -m benchmarks.startup [-r 5] [--model weights/smollm2-135m-instruct]

Each command is a fresh process (interpreter start, imports, model load, prompt, 16 greedy new
tokens, exit), run in turns so that a busy spell of a shared machine hits all of them alike.
Peak resident memory is the child's maximum RSS as the kernel reports it (`ru_maxrss`).
llama.cpp reads the F32 GGUF written from the same folder (benchmarks/gguf_writer.py); the row
is skipped when `llama_cpp` is not importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gguf_writer import cached_gguf

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
N_NEW = 16

# The llama-cpp-python side: load, tokenize as llama.cpp does, 16 greedy tokens, print them.
LLAMA_SCRIPT = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, verbose=False)
out = llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0)
sys.stdout.write(out["choices"][0]["text"])
"""


def timed(command: list[str]) -> tuple[float, float, str]:
    """Seconds of wall time, peak RSS in MB of the child, and its stdout. ru_maxrss of children
    is the largest of any child so far (KiB on Linux), so call this once per process."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, result.stdout


def measure(command: list[str]) -> tuple[float, float, str]:
    """`timed` run in a child Python, so that ru_maxrss belongs to this command alone."""
    code = (
        "import json, sys; from benchmarks.startup import timed; "
        "print(json.dumps(timed(json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(command)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    seconds, peak_mb, stdout = json.loads(out.stdout)
    return seconds, peak_mb, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", type=int, default=5, help="runs of each command")
    parser.add_argument("--model", type=Path, default=ROOT / "weights" / "smollm2-135m-instruct")
    args = parser.parse_args()

    gptcli = [str(Path(sys.executable).with_name("gptcli"))]
    commands = {
        "gptcli --help": [*gptcli, "--help"],
        "gptcli generate -n 16": [
            *gptcli, "generate", PROMPT, "-m", str(args.model), "-n", str(N_NEW), "--temp", "0",
        ],
    }  # fmt: skip
    if importlib.util.find_spec("llama_cpp") is not None:
        gguf = cached_gguf(args.model, "F32", ROOT / "weights" / ".cache" / "gguf")
        commands["llama-cpp-python (f32)"] = [
            sys.executable, "-c", LLAMA_SCRIPT, str(gguf), PROMPT, str(N_NEW),
        ]  # fmt: skip
    else:
        print("llama_cpp is not installed: its row is skipped", file=sys.stderr)

    times: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[float]] = {name: [] for name in commands}
    texts: dict[str, str] = {}
    for name, command in commands.items():  # one uncounted warm-up each (file cache)
        texts[name] = measure(command)[2]
    for _ in range(args.r):
        for name, command in commands.items():
            seconds, peak, _ = measure(command)
            times[name].append(seconds)
            peaks[name].append(peak)

    weights_mb = sum(p.stat().st_size for p in args.model.glob("*.safetensors")) / 1e6
    print(
        f"{args.model.name} ({weights_mb:.0f} MB of safetensors), {os.cpu_count()} cores, {args.r} runs"
    )
    print(f"{'command':26} {'wall s':>14} {'peak RSS MB':>12}")
    for name in commands:
        mean, sd = statistics.mean(times[name]), statistics.pstdev(times[name])
        print(f"{name:26} {mean:8.2f} ± {sd:4.2f} {max(peaks[name]):12.0f}")
    if "llama-cpp-python (f32)" in times:
        ratio = statistics.mean(times["gptcli generate -n 16"]) / statistics.mean(
            times["llama-cpp-python (f32)"]
        )
        print(f"gptcli generate / llama-cpp-python wall time: {ratio:.2f}x")
    for name in ("gptcli generate -n 16", "llama-cpp-python (f32)"):
        if name in texts:
            print(f"{name} text: {texts[name]!r}")


if __name__ == "__main__":
    main()
