"""`--gpus`: the devices of an expert-parallel server, one rank (process) each.

`--gpus 0,1` puts rank 0 on cuda:0 and rank 1 on cuda:1; each GPU then holds its own shard of
the expert cache. `--gpus cpu:N` runs N ranks on the CPU over gloo: it has no use but the tests
(the CPU is one device), which is why it is not in the option's help.
"""

from __future__ import annotations

import torch
from moe_core import SettingError

__all__ = ["parse_gpus"]

_FORMAT = "comma-separated GPU indices such as 0,1"


def parse_gpus(text: str, device: str) -> tuple[str, ...]:
    """The device of each rank that `--gpus TEXT` names, given `--device DEVICE`.

    Raises:
        SettingError: an empty list, an index that is not a number, a GPU named twice or not
            present, or a `--device` other than auto (or cuda) beside it; one line each.
    """
    text = text.strip()
    if text.startswith("cpu:"):
        count = text.removeprefix("cpu:")
        if not count.isdigit() or int(count) < 1:
            raise SettingError(f"--gpus cpu:N needs a number of CPU ranks N >= 1, got {text!r}")
        if device not in ("auto", "cpu"):
            raise SettingError(f"--gpus {text} runs on the CPU; it cannot go with --device "
                               f"{device}")
        return ("cpu",) * int(count)
    parts = [p.strip() for p in text.split(",")]
    if not text or not any(parts):
        raise SettingError(f"--gpus needs at least one GPU ({_FORMAT}), got {text!r}")
    if not all(p.isdigit() for p in parts):
        raise SettingError(f"--gpus takes {_FORMAT}, got {text!r}")
    indices = [int(p) for p in parts]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise SettingError(f"--gpus names GPU {twice[0]} more than once ({text!r}); each GPU "
                           "runs one rank")
    if device not in ("auto", "cuda"):
        raise SettingError(f"--gpus picks the devices itself; leave --device at auto (got "
                           f"--device {device})")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise SettingError("--gpus: no CUDA GPU is available on this machine")
    missing = [i for i in indices if i >= available]
    if missing:
        raise SettingError(f"--gpus: GPU {missing[0]} is not present; this machine has "
                           f"{available} (0..{available - 1})")
    return tuple(f"cuda:{i}" for i in indices)
