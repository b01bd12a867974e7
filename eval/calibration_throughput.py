"""Throughput of calibration: tokens per second in 1 and 2 processes, and how time grows.

Each measurement is one run of ``kvquant.hf.calibrate.calibrate`` — the default configuration
(``configs/default.yaml``: pre-RoPE, channel groups of 128, 8-bit scales, 3.65 effective bits per
key entry allocated by Fisher-weighted water-filling, so one forward and one backward per window)
on windows from the end of the default text — timed from the first window to the codebooks built
(model loading and process start-up excluded), every process with ONE thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). 2 processes: ``accelerate launch
--multi_gpu --num_processes 2`` of this script's worker mode (gloo on the CPU; windows sharded by
rank, statistics all-reduced, :mod:`kvquant.hf.distributed`), timed between two barriers. All runs in
one invocation, one after another, so their ratios share the machine's state.

Usage:  python eval/calibration_throughput.py [--model smollm2-135m] [--samples 8] [--seqlen 2048]
                                              [--grid-windows 2] [--grid-seqlens 512,1024]
Writes out/calibration_throughput.json and the BENCHMARKS.md section ``calibration-throughput``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process of a measurement: load, calibrate (timed between barriers), print JSON on rank 0."""
    import torch

    from kvquant.hf import distributed
    from kvquant.io.assets import load_model
    from kvquant.hf.calibrate import CalibrationConfig, calibrate
    from kvquant.cli import DEFAULTS, calibration_config
    from kvquant.io.data import load_text, make_windows
    from kvquant.io.fingerprint import ModelFingerprint

    torch.set_num_threads(1)
    distributed.init("cpu")
    model, tok = load_model(args.model, dtype=torch.float32)  # the float32 tables of BENCHMARKS.md
    windows = make_windows(tok, load_text(DEFAULTS["dataset"], split="train"), args.seqlen, args.samples,
                           from_end=True, source=DEFAULTS["dataset"])
    config = CalibrationConfig(calibration_config({**DEFAULTS, "seqlen": args.seqlen},
                                                  ModelFingerprint.from_model(model).head_dim, args.seqlen,
                                                  defaulted=set(DEFAULTS) - {"seqlen"}))
    distributed.barrier()
    t0 = time.perf_counter()
    books = calibrate(model, windows, config, progress=False)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        print(json.dumps({"processes": distributed.world()[1], "windows": args.samples, "seqlen": args.seqlen,
                          "seconds": seconds, "tokens_per_s": args.samples * args.seqlen / seconds,
                          "k_levels_sum": int(books.k.channel_levels.sum())}))


def measure(model: str, samples: int, seqlen: int, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    me = [str(Path(__file__).resolve()), "--worker", "--model", model, "--samples", str(samples), "--seqlen", str(seqlen)]
    if processes == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *me]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"measurement failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    print(f"{processes} process(es), {samples} windows × {seqlen}: {result['seconds']:.1f} s, "
          f"{result['tokens_per_s']:.0f} tokens/s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--grid-windows", default="2", help="more window counts at --seqlen, 1 process")
    ap.add_argument("--grid-seqlens", default="512,1024", help="more seqlens at the smallest grid window count, 1 process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from kvquant.io.fileio import replace_section, write_text

    one = measure(args.model, args.samples, args.seqlen, 1)
    two = measure(args.model, args.samples, args.seqlen, 2)
    grid_windows = [int(n) for n in args.grid_windows.split(",") if n]
    grid = [one] + [measure(args.model, n, args.seqlen, 1) for n in grid_windows]
    small = min(grid_windows or [args.samples])
    grid += [measure(args.model, small, s, 1) for s in (int(s) for s in args.grid_seqlens.split(",") if s)]
    ratio = two["seconds"] / one["seconds"]
    payload = {"model": args.model, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "one": one, "two": two, "ratio_two_over_one": ratio, "same_allocation": one["k_levels_sum"] == two["k_levels_sum"],
               "grid": grid}
    write_text(ROOT / "out" / "calibration_throughput.json", json.dumps(payload, indent=1))
    lines = [
        f"`python eval/calibration_throughput.py --model {args.model} --samples {args.samples} --seqlen {args.seqlen} "
        f"--grid-windows {args.grid_windows} --grid-seqlens {args.grid_seqlens}` — {payload['machine']}, the default "
        "configuration (configs/default.yaml: Fisher-weighted allocation, so a forward and a backward per window), "
        "float32, one thread per process, calibration timed from the first window to the codebooks built (loading excluded); "
        "out/calibration_throughput.json",
        "",
        "| processes | windows × seqlen | seconds | tokens/s |",
        "|---:|---|---:|---:|",
    ]
    for r in [one, two] + grid[1:]:
        lines.append(f"| {r['processes']} | {r['windows']} × {r['seqlen']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} |")
    lines += ["", f"2 processes take {ratio:.2f}× the wall time of 1 (target ≤ 0.6×); the same level allocation: "
              f"{payload['same_allocation']}."]
    replace_section(ROOT / "BENCHMARKS.md", "calibration-throughput", "## Calibration throughput (1 and 2 processes)\n\n"
                    + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
