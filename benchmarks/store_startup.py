"""Start-up from a packed store file: how long `moe-core pack` takes, and how long a later start
takes to read the file into pinned arenas, with each phase's peak host memory; the read is timed
twice, with the per-expert checksums verified (the default) and without, then again from the page
cache (`--warm-repeats` alternating reads of each kind, medians), where the check costs the most.

Run on the GPU machine (pinning needs CUDA):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/store_startup.py --num-layers 12 \
        --dir /tmp/store --out $OUT/startup.json

Each phase runs in its own process and reports its own peak resident memory (`ru_maxrss`).
Before each read, the page cache is dropped when the machine allows it (root), so the read comes
from disk; the record says whether it did (if not, the reads come from the page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACK = """
import json, resource, sys, time
from moe_core.offload.packing import pack_model
t0 = time.perf_counter()
pack_model(sys.argv[1], sys.argv[2], dtype="bfloat16", num_layers=int(sys.argv[3]), dummy=True)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

READ = """
import json, resource, sys, time
import torch
from moe_core.offload.packed_store import read_packed
if torch.cuda.is_available():
    torch.cuda.init()  # the CUDA context's own memory is not the store's
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
store = read_packed(sys.argv[1], pin=True, verify=sys.argv[2] == "verify")
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": store.nbytes,
                  "pinned": store.is_pinned, "base_rss": base,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

WARM = """
import json, statistics, sys, time
from moe_core.offload.packed_store import read_packed
seconds = {"verify": [], "skip": []}
for i in range(int(sys.argv[2])):
    for mode in ("verify", "skip") if i % 2 else ("skip", "verify"):
        t0 = time.perf_counter()
        store = read_packed(sys.argv[1], pin=True, verify=mode == "verify")
        seconds[mode].append(time.perf_counter() - t0)
        del store
print(json.dumps({mode: statistics.median(s) for mode, s in seconds.items()}))
"""


def child(code: str, *args: str) -> tuple[float, dict[str, Any]]:
    """Run `code` in a fresh Python; returns (wall seconds, the JSON it printed last)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        sys.exit(f"store_startup: child failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, json.loads(done.stdout.strip().splitlines()[-1])


def drop_page_cache() -> bool:
    """Flush and drop the page cache; False where not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    """Pack, drop caches, read; write the JSON record and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-store"))
    parser.add_argument("--warm-repeats", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "experts.moepack"
    record: dict[str, Any] = {"model": args.model, "num_layers": args.num_layers}
    pack_s, pack = child(PACK, args.model, str(path), str(args.num_layers))
    record.update(pack_process_seconds=pack_s, pack_seconds=pack["seconds"],
                  pack_peak_rss_bytes=pack["peak_rss"], file_bytes=path.stat().st_size)
    for mode, prefix in (("verify", "read"), ("skip", "unverified_read")):
        record["page_cache_dropped"] = drop_page_cache()
        read_s, read = child(READ, str(path), mode)
        record.update({f"{prefix}_process_seconds": read_s, f"{prefix}_seconds": read["seconds"],
                       f"{prefix}_gbps": read["bytes"] / read["seconds"] / 1e9,
                       f"{prefix}_peak_rss_bytes": read["peak_rss"]},
                      store_bytes=read["bytes"], pinned=read["pinned"],
                      read_rss_before_bytes=read["base_rss"])
    _, warm = child(WARM, str(path), str(args.warm_repeats))
    record.update(warm_read_seconds=warm["verify"], warm_unverified_read_seconds=warm["skip"])
    path.unlink()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
