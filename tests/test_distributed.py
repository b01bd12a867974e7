"""Calibration over 2 processes (gloo, CPU) gives the codebooks of 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_model, make_tokenizer, text_of
from safetensors.torch import load_file

from kvquant.hf import distributed
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.cli import main
from kvquant.codebooks import CodebookConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = CalibrationConfig(CodebookConfig(norm="channel-group", group=4, sink=1, budget=3.0, bits_q=5, bits_k=5, rope="pre"))
WINDOWS = torch.randint(3, 128, (5, 12), generator=torch.Generator().manual_seed(0))  # 5: uneven shards


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert distributed.world() == (rank, world)
        books = calibrate(make_model("llama"), WINDOWS, CONFIG, progress=False)
        if distributed.is_main():
            books.save(out)
    finally:
        dist.destroy_process_group()


def _same_file(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        if k.endswith("channel_levels"):
            assert torch.equal(ta[k], tb[k]), k  # the same level allocation
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-9, atol=1e-12, msg=k)


def test_two_processes_give_the_codebooks_of_one(tmp_path):
    one = tmp_path / "one.safetensors"
    calibrate(make_model("llama"), WINDOWS, CONFIG, progress=False).save(one)
    two = tmp_path / "two.safetensors"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(two)), nprocs=2, join=True)
    _same_file(one, two)


def test_one_process_is_unchanged():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.shard(WINDOWS) is not None and torch.equal(distributed.shard(WINDOWS), WINDOWS)
    assert distributed.init("cpu") == "cpu"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's launcher")
def test_accelerate_launch_two_processes_cli(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m kvquant calibrate`` on the CPU (gloo):
    the file equals the single-process one and only the main process writes and prints."""
    model = tmp_path / "tiny"
    make_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    text = tmp_path / "corpus.txt"
    text.write_text(text_of(400), encoding="utf-8")
    args = ["calibrate", "--model", str(model), "--text-file", str(text), "--seqlen", "16", "--samples", "4",
            "--group", "8", "--effective-bits", "6", "--out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kvquant"]
    two = subprocess.run(launch + args + [str(tmp_path / "two.safetensors")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1
    assert main(args + [str(tmp_path / "one.safetensors")]) == 0
    _same_file(tmp_path / "one.safetensors", tmp_path / "two.safetensors")
