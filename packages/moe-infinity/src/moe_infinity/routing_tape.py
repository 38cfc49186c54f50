"""Routing tapes from trace files: what `moe_core.routing_for(model, "replay:traces.bin")` replays.

moe-core replays a `RoutingTape` (`[S, L, K]` expert ids, one token per step) without knowing
where it came from; this reads one from a `moe-infinity trace` file and is registered as the
`traces` entry point of the `moe_core.routing_tapes` group.

Only decode steps are taken (one token each at batch 1, so exactly top-k experts per layer), all
requests one after another in file order: a prefill step's many tokens have no order to replay.
A decode step whose layers do not each hold exactly top-k experts (a trace recorded at batch > 1)
is refused. The tape carries the trace's recorded lookahead too (layer l's router on layer l-1's
hidden state at each step), which a lookahead prefetcher reads while the tape replays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from moe_core import RoutingTape

from moe_infinity.errors import TraceFileError
from moe_infinity.trace import TraceSet
from moe_infinity.trace_file import load_traces

__all__ = ["load_routing_tape", "routing_tape"]


def routing_tape(traces: TraceSet) -> RoutingTape:
    """The decode steps of `traces` as a tape `[S, L, K]`, requests in order.

    Raises:
        ValueError: no decode step, or a decode step without exactly top-k experts per layer.
    """
    top_k = traces.shape.top_k
    steps, looks = [], []
    for trace in traces:
        decode = trace.step_counts[1:] > 0  # [S, L, E]
        if not decode.size:
            continue
        if (decode.sum(axis=-1) != top_k).any():
            raise ValueError(f"request {trace.request_id!r} has decode steps without exactly "
                             f"{top_k} experts per layer (traced at batch > 1?)")
        steps.append(np.nonzero(decode)[2].reshape(decode.shape[0], decode.shape[1], top_k))
        looks.append(trace.lookahead[1:])
    if not steps:
        raise ValueError("the traces hold no decode step to replay")
    ids = torch.from_numpy(np.concatenate(steps).astype(np.int64))
    lookahead = torch.from_numpy(np.concatenate(looks).astype(np.float32))
    return RoutingTape(ids, traces.shape.num_experts, lookahead)


def load_routing_tape(path: Path) -> RoutingTape:
    """The tape of the trace file at `path` (see `routing_tape`).

    Raises:
        TraceFileError: the file is missing, corrupt, or holds nothing to replay.
    """
    try:
        return routing_tape(load_traces(path))
    except ValueError as exc:
        raise TraceFileError(f"{path}: {exc}") from None
