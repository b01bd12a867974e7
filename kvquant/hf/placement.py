"""Where a model's inputs go, also when accelerate's big-model placement spreads it over devices."""

from __future__ import annotations

import re

import torch


def input_device(model: torch.nn.Module) -> torch.device:
    """The device token ids must be on: the input embedding's. With ``device_map`` placement
    (``from_pretrained(..., device_map="auto")``, layers on several devices or offloaded) weights
    kept on the CPU or on disk sit on ``meta`` between calls and accelerate's hooks move each
    layer's inputs — ids then start on the CPU."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


#: A memory size as accelerate reads it: a number and an optional unit (bytes without one).
_SIZE = re.compile(r"^(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGT]i?B|B)?$", re.I)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=20GiB,cpu=300MiB"`` → ``{0: "20GiB", "cpu": "300MiB"}`` (accelerate's ``max_memory``)."""
    out: dict[int | str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        device, _, size = (t.strip() for t in item.partition("="))
        if not size or not device:
            raise ValueError(f"--max-memory takes DEVICE=SIZE pairs such as 0=20GiB,cpu=2GiB; got {item!r}")
        m = _SIZE.match(size)
        if not m or float(m["n"]) <= 0:
            raise ValueError(f"--max-memory {item!r}: a size is a positive number of bytes with a unit such as "
                             "MiB or GiB (e.g. cpu=8GiB)")
        key = int(device) if device.isdigit() else device
        if key in out:  # the last would win silently
            raise ValueError(f"--max-memory names {device} twice ({device}={out[key]}, {item}): give each device once")
        out[key] = size
    if not out:
        raise ValueError("--max-memory is empty")
    return out
