"""One-step CLI runs on a 142M-parameter base: the engine's cliff past toy sizes (issue 8, item 7).

Builds (once, into `--model-dir`) the base of the issue with `build_tiny_model` (hidden 1024,
intermediate 2816, 12 layers), writes 32 short chat rows and a spec with `max_steps: 1`,
`batch_size: 8` and the defaults otherwise (NF4 + double quant, bf16 compute, 4 micro-batches
per step, gradient checkpointing, packing), then runs the command the issue timed,

    python -m worker.training --spec spec.json --data train.jsonl --out DIR

`--repeats` times per mode, the modes alternating: `auto` (the engine picks its CPU thread
count by probing) and `all-cpus` (`TRAIN_CPU_THREADS` = every CPU, torch's default and the
engine's behaviour before the fix). With `--contender` another torch process at its default
thread count runs small operators in a loop for the whole benchmark, as other engineers' test
runs do on a shared machine: that is where the cliff was. Prints one line per run and the
median and range per mode; exits 1 if an `auto` run took longer than `--max-seconds` or did
not finish.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/engine_step.py [--repeats 3] [--contender]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12}
CONTENDER = """
import torch
x = torch.randn(512, 1024)
while True:
    y = x
    for _ in range(50):
        y = y * 0.5 + x
"""


def chat_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 12)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Say hi to {name}"},
                    {"role": "assistant", "content": f"Hello {name}, nice to meet you!"},
                ]
            }
        )
    return rows


def ensure_base(model_dir: Path) -> Path:
    """Build the base once; a folder holding a config of the same size is reused."""
    config = model_dir / "config.json"
    if config.is_file():
        existing = json.loads(config.read_text())
        if all(existing.get(k) == v for k, v in SIZE.items()):
            return model_dir
    sys.path.insert(0, str(ROOT))
    from worker.training.tiny import build_tiny_model

    return build_tiny_model(model_dir, **SIZE)


def child_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def run_once(mode: str, work: Path, cpus: int, index: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("TRAIN_CPU_THREADS", None)
    if mode == "all-cpus":
        env["TRAIN_CPU_THREADS"] = str(cpus)
    out = work / f"out-{mode}-{index}"
    user0, sys0 = child_cpu()
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.training",
            "--spec",
            str(work / "spec.json"),
            "--data",
            str(work / "train.jsonl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - start
    user1, sys1 = child_cpu()
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {
        "mode": mode,
        "rc": proc.returncode,
        "finished": proc.returncode == 0 and "stopped (" not in proc.stdout,
        "elapsed_s": elapsed,
        "engine_wall_s": metrics.get("wall_seconds"),
        "user_s": user1 - user0,
        "sys_s": sys1 - sys0,
        "threads": metrics.get("cpu_threads"),
        "load1": os.getloadavg()[0],
        "stderr_tail": proc.stderr[-400:] if proc.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode")
    parser.add_argument("--modes", default="auto,all-cpus", help="comma-separated, alternating")
    parser.add_argument("--contender", action="store_true", help="a competing torch process")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="limit for auto runs")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "engine-step-base",
        help="base model folder (built if missing)",
    )
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    ensure_base(args.model_dir)
    modes = args.modes.split(",")
    print(f"base {args.model_dir}, {cpus} CPUs, contender {args.contender}, load {os.getloadavg()}")
    contender = (
        subprocess.Popen([sys.executable, "-c", CONTENDER], env={**os.environ})
        if args.contender
        else None
    )
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="engine-step-") as tmp:
            work = Path(tmp)
            (work / "train.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in chat_rows(32, seed=0))
            )
            spec = {
                "base_model": str(args.model_dir),
                "max_steps": 1,
                "batch_size": 8,
                "checkpoint_steps": None,
            }
            (work / "spec.json").write_text(json.dumps(spec))
            for i in range(args.repeats):
                for mode in modes:
                    r = run_once(mode, work, cpus, i)
                    results.append(r)
                    print(
                        f"{mode:9s} run {i + 1}: {r['elapsed_s']:6.1f} s elapsed, engine "
                        f"{r['engine_wall_s'] or float('nan'):6.1f} s, user {r['user_s']:6.1f} s, "
                        f"sys {r['sys_s']:4.1f} s, threads {r['threads']}, "
                        f"load {r['load1']:.2f}, {'finished' if r['finished'] else 'NOT finished'}",
                        flush=True,
                    )
                    if r["stderr_tail"]:
                        print(r["stderr_tail"])
    finally:
        if contender is not None:
            contender.kill()
            contender.wait()
    print()
    print("| mode | runs | elapsed s median (min-max) | user CPU s median |")
    print("| --- | --- | --- | --- |")
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        el = [r["elapsed_s"] for r in rs]
        print(
            f"| {mode} | {len(rs)} | {statistics.median(el):.1f} ({min(el):.1f}-{max(el):.1f}) "
            f"| {statistics.median(r['user_s'] for r in rs):.1f} |"
        )
    bad = [
        r
        for r in results
        if r["mode"] == "auto" and (not r["finished"] or r["elapsed_s"] > args.max_seconds)
    ]
    if bad:
        print(f"FAIL: {len(bad)} auto run(s) unfinished or over {args.max_seconds:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
