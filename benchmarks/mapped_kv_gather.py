"""The past-KV gather of moe-gen's decode step, three ways, on one GPU: the host gathers the pages
into pinned staging and copies them (`KVMover`, one thread), the GPU reads them itself
(`moe_core.MappedRowGather`, decision 0022) over grids of several sizes, and a plain copy of
contiguous pinned memory (the link's copy rate). Then the mapped gather beside a stream of
expert-block copies (do the two share the link additively?) and beside matrix products (what do
they cost each other?).

The arena is paged like moe-gen's (16-token pages handed out in random order); one gather is a
micro-batch of 128 sequences x 608 cached tokens of one KV tensor (Qwen3-30B-A3B: 4 KV heads x
128 channels, bf16, 1 KiB per token), as at batch 512.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 benchmarks/mapped_kv_gather.py \
        --out $OUT/mapped-kv-gather.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from moe_core import MappedRowGather
from moe_gen.kv_mover import KVMover

PAGE = 16


def timed(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median seconds of `fn` (synchronised), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def page_slots(num_pages: int, seqs: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Slots `[seqs * tokens]` of `seqs` sequences whose pages are random pages of the arena."""
    per_seq = -(-tokens // PAGE)
    pages = torch.randperm(num_pages, generator=generator)[: seqs * per_seq].view(seqs, per_seq)
    pos = torch.arange(tokens)
    return (pages[:, pos // PAGE] * PAGE + pos % PAGE).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arena-gib", type=float, default=4.0)
    parser.add_argument("--row", default="4,128", help="per-token shape of one KV tensor")
    parser.add_argument("--seqs", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=608)
    parser.add_argument("--gathers", type=int, default=8, help="gathers per timed call")
    args = parser.parse_args()
    device = torch.device("cuda")
    shape = tuple(int(x) for x in args.row.split(","))
    row_bytes = 2 * torch.Size(shape).numel()
    slots_total = int(args.arena_gib * 2**30) // row_bytes // PAGE * PAGE
    arena = torch.empty((slots_total, *shape), dtype=torch.bfloat16, pin_memory=True)
    arena.view(torch.int16).random_()
    generator = torch.Generator().manual_seed(0)
    gathers = [page_slots(slots_total // PAGE, args.seqs, args.tokens, generator)
               for _ in range(args.gathers)]
    nbytes = sum(g.numel() for g in gathers) * row_bytes
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "row_shape": shape,
                              "row_bytes": row_bytes, "arena_bytes": arena.numel() * 2,
                              "gather_bytes": nbytes / args.gathers, "gathers": args.gathers}

    # The link's copy rate: contiguous pinned memory, the same bytes.
    flat = arena.view(-1)[: nbytes // 2]
    target = torch.empty_like(flat, device=device)
    record["copy_gb_s"] = nbytes / timed(lambda: target.copy_(flat, non_blocking=True)) / 1e9

    # The staged path as the engine runs it: a worker gathers on the host, then one copy each.
    mover = KVMover(device, ring_size=4)

    def staged() -> None:
        mover.plan([(arena, g) for g in gathers])
        for g in gathers:
            mover.gather(arena, g)
            mover.release()

    record["staged_gb_s"] = nbytes / timed(staged) / 1e9
    mover.close()

    # The GPU's own gather, over grids of several sizes.
    on_device = [g.to(device) for g in gathers]
    outs = [torch.empty((g.numel(), *shape), dtype=torch.bfloat16, device=device)
            for g in gathers]
    mapped: dict[str, float] = {}
    for blocks in (8, 16, 32, 64, 132, 264, 528):
        gather = MappedRowGather(device, blocks)

        def run(gather: MappedRowGather = gather) -> None:
            for g, o in zip(on_device, outs, strict=True):
                gather(arena, g, o)

        mapped[str(blocks)] = nbytes / timed(run) / 1e9
    record["mapped_gb_s_by_blocks"] = mapped
    for g, o in zip(gathers, outs, strict=True):
        # Bit for bit (the random bits include NaNs, which never equal themselves).
        assert torch.equal(o.cpu().view(torch.int16), arena[g].view(torch.int16)), \
            "the mapped gather read the wrong rows"

    # Beside a stream of expert copies (separate streams, as in the engine).
    experts = torch.empty(nbytes // 2 // 4, dtype=torch.bfloat16, pin_memory=True)
    expert_target = torch.empty_like(experts, device=device)
    copy_stream, gather_stream = torch.cuda.Stream(), torch.cuda.Stream()
    default = MappedRowGather(device)

    def both() -> None:
        with torch.cuda.stream(copy_stream):
            expert_target.copy_(experts, non_blocking=True)
        with torch.cuda.stream(gather_stream):
            for g, o in zip(on_device, outs, strict=True):
                default(arena, g, o)

    seconds = timed(both)
    expert_bytes = experts.numel() * 2
    record["beside_expert_copies"] = {
        "expert_bytes": expert_bytes, "seconds": seconds,
        "link_gb_s": (nbytes + expert_bytes) / seconds / 1e9,
        "copy_alone_s": timed(lambda: expert_target.copy_(experts, non_blocking=True))}

    # Beside matrix products (expert-sized bf16 GEMMs on the default stream).
    a = torch.randn(4096, 2048, device=device, dtype=torch.bfloat16)
    w = torch.randn(2048, 768 * 2, device=device, dtype=torch.bfloat16)

    def products() -> None:
        for _ in range(200):
            a @ w

    alone = timed(products)

    def products_and_gather() -> None:
        with torch.cuda.stream(gather_stream):
            for g, o in zip(on_device, outs, strict=True):
                default(arena, g, o)
        products()

    together = timed(products_and_gather)
    gather_alone = timed(lambda: [default(arena, g, o) for g, o in
                                  zip(on_device, outs, strict=True)])
    record["beside_products"] = {"products_alone_s": alone, "gather_alone_s": gather_alone,
                                 "together_s": together,
                                 "overlap_saving_s": alone + gather_alone - together}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
