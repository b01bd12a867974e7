"""Models larger than memory: layers offloaded to disk by accelerate calibrate and evaluate as in memory."""

from __future__ import annotations

import pytest
import torch

from kvquant.io.assets import load_model
from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.evaluation.perplexity import evaluate
from kvquant.hf.placement import input_device, parse_max_memory

CONFIG = CalibrationConfig(CodebookConfig(norm="channel-group", group=4, sink=1, budget=3.0, bits_q=5, bits_k=5,
                                          rope="pre"))
WINDOWS = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))


def test_offloaded_model_calibrates_and_evaluates_as_in_memory(model_dir, tmp_path):
    in_memory, _ = load_model(str(model_dir))
    offloaded, _ = load_model(str(model_dir), device_map="auto", max_memory={"cpu": "40KiB"},
                              offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map  # the limit forced offload
    assert input_device(offloaded) == torch.device("cpu")
    a = calibrate(in_memory, WINDOWS, CONFIG, progress=False)  # Fisher weights: backward through offloaded layers
    b = calibrate(offloaded, WINDOWS, CONFIG, progress=False)
    torch.testing.assert_close(a.stats.sqk, b.stats.sqk, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.hist.channel_fisher_k, b.hist.channel_fisher_k, rtol=1e-6, atol=1e-12)
    assert torch.equal(a.k.channel_levels, b.k.channel_levels)
    rows = {"fp": None, "lambda-lloyd": a}
    ra, rb = evaluate(in_memory, WINDOWS, rows, progress=False), evaluate(offloaded, WINDOWS, rows, progress=False)
    for name in rows:
        assert ra[name].ppl == pytest.approx(rb[name].ppl, rel=1e-6), name


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, cpu=300MiB") == {0: "20GiB", "cpu": "300MiB"}
    with pytest.raises(ValueError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_cli_device_map_offload_equals_in_memory(model_dir, tmp_path):
    from kvquant.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"word{i % 37}" for i in range(600)), encoding="utf-8")
    args = ["calibrate", "--model", str(model_dir), "--text-file", str(text), "--seqlen", "16", "--samples", "2",
            "--group", "8", "--effective-bits", "6", "--out"]
    assert main(args + [str(tmp_path / "mem.safetensors")]) == 0
    assert main(args + [str(tmp_path / "disk.safetensors"), "--device-map", "auto", "--max-memory", "cpu=40KiB",
                        "--offload-folder", str(tmp_path / "offload")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "mem.safetensors")), load_file(str(tmp_path / "disk.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-12, msg=k)
    assert main(args + [str(tmp_path / "x.safetensors"), "--max-memory", "cpu=1GiB"]) == 2  # ignored without --device-map


@pytest.mark.integration
def test_gemma3_offloaded_calibration_equals_in_memory(tmp_path):
    """Gemma3-270M (sliding-window layers) under a 200 MiB CPU limit: most layers on disk."""
    from kvquant.io.data import load_text, make_windows

    model, tok = load_model("gemma3-270m", dtype=torch.float32)
    windows = make_windows(tok, load_text("enwiki-excerpt"), 256, 1, from_end=True, source="enwiki-excerpt")
    a = calibrate(model, windows, CONFIG, progress=False)
    del model
    offloaded, _ = load_model("gemma3-270m", dtype=torch.float32, device_map="auto", max_memory={"cpu": "200MiB"},
                              offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map
    b = calibrate(offloaded, windows, CONFIG, progress=False)
    torch.testing.assert_close(a.stats.sqk, b.stats.sqk, rtol=1e-9, atol=1e-9)
    assert torch.equal(a.k.channel_levels, b.k.channel_levels) and torch.equal(a.q.channel_levels, b.q.channel_levels)
