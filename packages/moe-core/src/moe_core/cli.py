"""`moe-core`: inspect a checkpoint before loading it; generate with it.

Results go to stdout (`--json` for machines); errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

import moe_core
from moe_core.cli_app import tool_app
from moe_core.devices import check_device
from moe_core.embedded_model import TINY_MODEL_NAME
from moe_core.errors import RequestError, SettingError
from moe_core.loader import resolve_model_path
from moe_core.offload.loading import check_fetch_lanes
from moe_core.offload.prefill_ring import PREFILL_MODES
from moe_core.request_limits import Truncate, fit_prompt, parse_truncate
from moe_core.sizes import format_bytes, parse_bytes
from moe_core.spec import ModelSpec
from moe_core.spec_report import spec_report

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from moe_core.offload.prefetch_counts import LayerPrefetches

__all__ = ["app"]

app = tool_app("moe-core", moe_core.__version__,
               "moe-core: inspect and run mixture-of-experts checkpoints.", [
                   'moe-core generate -p "Once upon a time"    (the embedded tiny-moe, on the CPU)',
                   "moe-core inspect qwen3-30b-a3b --gpu-memory 16GiB    (how a model fits a GPU)",
               ])
_err = Console(stderr=True)


def _add_training_commands() -> None:
    from moe_core.tiny_training.cli import train_app

    app.add_typer(train_app, name="train-tiny")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _print_report(report: dict[str, object]) -> None:
    table = Table(title=f"{report['architecture']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    moe_layers, dense_layers = report["moe_layers"], report["dense_layers"]
    assert isinstance(moe_layers, list) and isinstance(dense_layers, list)
    rows = [
        ("layers", f"{report['num_layers']} ({len(moe_layers)} MoE, {len(dense_layers)} dense"
                   + (f": {dense_layers}" if dense_layers else "") + ")"),
        ("hidden / vocab", f"{report['hidden_size']} / {report['vocab_size']}"),
        ("attention", f"{report['attention']}, {report['num_heads']} heads, "
                      f"{report['num_kv_heads']} kv heads, head dim {report['head_dim']}"
                      + (f", kv latent {report['kv_lora_rank']}"
                         if report["kv_lora_rank"] else "")),
        ("rope", f"theta {report['rope_theta']:g}, scaling {report['rope_scaling']}"),
        ("experts", f"{report['num_experts']} routed, top-{report['top_k']} ({report['router']}), "
                    f"width {report['expert_intermediate_size']}"),
        ("shared experts", f"{report['num_shared_experts']} (width "
                           f"{report['shared_intermediate_size']})"),
        ("parameters", f"{_count(report['total_params'])} total, "  # type: ignore[arg-type]
                       f"{_count(report['active_params_per_token'])} active per token"),  # type: ignore[arg-type]
        (f"one expert ({report['dtype']})", format_bytes(report["expert_bytes"])),  # type: ignore[arg-type]
        ("all routed experts", format_bytes(report["routed_expert_bytes"])),  # type: ignore[arg-type]
        ("dense part (stays on GPU)", format_bytes(report["dense_bytes"])),  # type: ignore[arg-type]
        ("whole model", format_bytes(report["total_bytes"])),  # type: ignore[arg-type]
        ("experts read per token", format_bytes(report["activated_expert_bytes_per_token"])),  # type: ignore[arg-type]
        ("KV cache per token", format_bytes(report["kv_bytes_per_token"])),  # type: ignore[arg-type]
        (f"KV cache per {report['context_tokens']}-token sequence",
         format_bytes(report["kv_bytes_per_sequence"])),  # type: ignore[arg-type]
    ]
    if "gpu_fit" in report:
        rows.append((f"with {format_bytes(report['gpu_memory_bytes'])} of GPU",  # type: ignore[arg-type]
                     str(report["gpu_fit_summary"])))
    for field, value in rows:
        table.add_row(field, value)
    Console().print(table)


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(
        help="Checkpoint folder, hub id, known shape (e.g. qwen3-30b-a3b) or tiny-moe (the "
             "embedded model); only config.json is read.")] = TINY_MODEL_NAME,
    dtype: Annotated[str, typer.Option(help="Storage dtype for the memory figures.")] = "bfloat16",
    gpu_memory: Annotated[str | None, typer.Option(
        help="GPU memory budget, e.g. 12GiB: say how the model can run within it.")] = None,
    context: Annotated[int, typer.Option(
        min=1, help="Sequence length for the KV-cache figure.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a model's shape and the memory each part needs, from its config.json alone."""
    spec = ModelSpec.from_pretrained(resolve_model_path(model, weights=False))
    budget = parse_bytes(gpu_memory) if gpu_memory is not None else None
    report = spec_report(spec, dtype, budget, context)
    if as_json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_report(report)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(
        help="Checkpoint folder, hub id, or tiny-moe (the embedded model).")] = TINY_MODEL_NAME,
    *,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A prompt (repeatable).")],
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1)] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: int | None = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help="float32, bfloat16 or float16 (default: float32 on the CPU, else the "
             "checkpoint's).")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt in the chat template.")] = False,
    expert_memory: Annotated[str | None, typer.Option(
        help="Offload the routed experts to host memory and cache them in this much device "
             "memory, e.g. 8GiB (default: the whole model on the device).")] = None,
    store: Annotated[str | None, typer.Option(
        help="With --expert-memory: read the experts from this `moe-core pack` file.")] = None,
    verify_store: Annotated[bool, typer.Option(
        help="With --store: check every expert block against its checksum as the file is read "
             "(--no-verify-store skips it: faster when the file is in the page cache).")] = True,
    policy: Annotated[str, typer.Option(
        help="With --expert-memory: the eviction policy, lru or lfu, or activation "
             "(activation-aware, fed live by moe-infinity's predictor; needs moe-infinity "
             "installed; options: activation:collection=FILE,budget=N).")] = "lru",
    prefetch: Annotated[str, typer.Option(
        help="With --expert-memory: none, or lookahead (layer l+1's router on layer l's input "
             "guesses l+1's experts, prefetched while l runs; lookahead:top=N guesses N, "
             "default top-k). With --policy activation, lookahead prefetches its predictor's "
             "best guesses.")] = "none",
    fetch: Annotated[str, typer.Option(
        help="With --expert-memory: copy (misses are copied into the cache, which the policy "
             "manages) or mapped (the GPU reads misses from pinned host memory, no host sync "
             "per layer; the cache holds the experts loaded at start).")] = "copy",
    lanes: Annotated[int, typer.Option(
        help="With --fetch mapped: 1 (the GPU reads every miss) or 2 (each layer's misses are "
             "split between the GPU's reads and the CPU, which computes its share from host "
             "memory at the same time).")] = 1,
    prefill: Annotated[str, typer.Option(
        help="With --expert-memory: admit (prompts copy the experts they miss into the cache, "
             "evicting others) or stream (through a small ring of staging slots taken from "
             "--expert-memory, at the link's rate, none admitted).")] = "admit",
    cpu_kernel: Annotated[str, typer.Option(
        help="With --lanes 2: the CPU expert kernel, auto (the fastest, measured at start), "
             "torch or numba.")] = "auto",
    stats: Annotated[bool, typer.Option(
        help="With --expert-memory: print the offload counters (hits, misses, bytes, copy and "
             "stall time) to stderr.")] = False,
    graphs: Annotated[bool, typer.Option(
        help="On CUDA, decode through captured CUDA graphs where the model allows it "
             "(--no-graphs: launch every kernel from Python, e.g. to compare).")] = True,
    truncate: Annotated[str | None, typer.Option(
        help="A prompt too long for the model's context (with --max-new-tokens): left drops "
             "its start, right its end (default: refuse it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")] = False,
) -> None:
    """Generate completions, with the whole model on the device or its experts offloaded."""
    from moe_core.loader import load_model

    if (store is not None or stats or fetch != "copy" or prefetch != "none"
            or prefill != "admit") and expert_memory is None:
        raise SettingError("--store, --fetch, --prefetch, --prefill and --stats need "
                           "--expert-memory (offloaded experts)")
    check_fetch_lanes(fetch, lanes, "--fetch mapped (and --expert-memory)")
    if prefill not in PREFILL_MODES:
        raise SettingError(f"--prefill must be admit or stream, got {prefill!r}")
    if cpu_kernel not in ("auto", "torch", "numba"):
        raise SettingError(f"--cpu-kernel must be auto, torch or numba, got {cpu_kernel!r}")
    check_device(device)
    tokenizer, rows = _prompt_rows(model, prompt, chat, max_new_tokens, parse_truncate(truncate))
    runtime = None
    if expert_memory is None:
        net = load_model(model, device=device, dtype=dtype)
    else:
        from moe_core.offload.cache_plans import cache_plan
        from moe_core.offload.loading import load_offloaded

        plan = cache_plan(policy, prefetch, ModelSpec.from_pretrained(
            resolve_model_path(model, weights=False)))
        loaded = load_offloaded(model, device, parse_bytes(expert_memory), dtype=dtype,
                                store=store, policy=plan.policy,
                                fetch=fetch,  # type: ignore[arg-type]
                                verify_store=verify_store, prefetcher=plan.prefetcher,
                                two_lanes=lanes == 2, cpu_kernel=cpu_kernel,
                                prefill=prefill)
        net, runtime = loaded.model, loaded.runtime
        if runtime.store.layout.is_fp8:  # never silent (the store file chose it)
            _err.print(f"experts: fp8 (e4m3, a float32 scale per output channel), dequantised "
                       f"to {str(net.dtype).removeprefix('torch.')} on the device")
    result = net.generate_full(rows, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed,
                               graphs=None if graphs else False)
    for i, text_prompt in enumerate(prompt):
        ids = result.tokens[i, : result.lengths[i]].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if as_json:
            print(json.dumps({"prompt": text_prompt, "text": text, "new_tokens": len(ids),
                              "finish_reason": result.finish_reasons[i]}))
        else:
            # Plain prompts are continued; chat prompts are answered, so show the two turns.
            print(f"user: {text_prompt}\nassistant: {text}" if chat else f"{text_prompt}{text}")
    if stats and runtime is not None:
        _print_stats(runtime.summary())
        _print_prefetch_layers(runtime.prefetch_by_layer())
    if runtime is not None:
        runtime.close()


def _prompt_rows(model: str, prompts: list[str], chat: bool, max_new_tokens: int,
                 truncate: Truncate | None) -> tuple[PreTrainedTokenizerBase, list[list[int]]]:
    """The tokenizer and each prompt's tokens, checked against the model's context before any
    weight is read."""
    from moe_core.tokenizer import load_tokenizer, render_chat

    folder = resolve_model_path(model, weights=False)
    tokenizer = load_tokenizer(folder)
    context = ModelSpec.from_pretrained(folder).max_position_embeddings
    rows = []
    for number, text in enumerate(prompts, start=1):
        ids = (render_chat(tokenizer, [{"role": "user", "content": text}]) if chat
               else tokenizer(text)["input_ids"])
        try:
            rows.append(fit_prompt(ids, max_new_tokens, context, truncate))
        except RequestError as exc:
            raise RequestError(f"--prompt {number}: {exc}") from None
    return tokenizer, rows


def _print_stats(summary: dict[str, int | float]) -> None:
    """The offload counters, one `name value` row each, on stderr."""
    table = Table(title="offload", show_header=False, title_justify="left")
    table.add_column("counter", style="bold")
    table.add_column("value", justify="right")
    for name, value in summary.items():
        if name.endswith("bytes") or name == "bytes_copied":
            shown = format_bytes(int(value))
        elif name.endswith("seconds"):
            shown = f"{value * 1e3:.1f} ms"
        elif name == "hit_rate":
            shown = f"{value:.1%}"
        else:
            shown = str(value)
        table.add_row(name, shown)
    _err.print(table)


def _print_prefetch_layers(layers: dict[int, LayerPrefetches]) -> None:
    """Prefetches issued, used and wasted per layer, on stderr (nothing when none were)."""
    if not layers:
        return
    table = Table(title="prefetches by layer", title_justify="left")
    for column in ("layer", "issued", "used", "wasted"):
        table.add_column(column, justify="right")
    for layer, counts in layers.items():
        table.add_row(str(layer), str(counts.issued), str(counts.used), str(counts.wasted))
    _err.print(table)


@app.command()
def pack(
    model: Annotated[str, typer.Argument(
        help="Checkpoint folder, hub id, known shape (with --dummy) or tiny-moe.")],
    out: Annotated[str, typer.Argument(help="The store file to write, e.g. experts.moepack.")],
    dtype: Annotated[str | None, typer.Option(
        help="Storage dtype (default: the checkpoint's).")] = None,
    num_layers: Annotated[int | None, typer.Option(
        min=1, help="Keep only the first N decoder layers.")] = None,
    dummy: Annotated[bool, typer.Option(help="Random experts from config.json alone.")] = False,
    seed: int = 0,
    expert_dtype: Annotated[str | None, typer.Option(
        help="fp8: quantise the experts to e4m3 with a scale per output channel (half of bf16's "
             "bytes over PCIe; moe-gen runs them).")] = None,
) -> None:
    """Pack a model's routed experts into one aligned store file, for fast offloaded starts."""
    import resource
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from moe_core.offload.packing import pack_model

    started = time.perf_counter()
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=_err, transient=True) as bar:
        task = bar.add_task("packing experts", total=None)
        header = pack_model(model, out, dtype=dtype, num_layers=num_layers, dummy=dummy,
                            seed=seed, expert_dtype=expert_dtype,
                            progress=lambda done, total: bar.update(task, completed=done,
                                                                    total=total))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    _err.print(f"wrote {out}: {len(header.moe_layers)} MoE layers x {header.num_experts} "
               f"{header.dtype} experts, "
               f"{format_bytes(header.file_bytes)} in {seconds:.1f} s (peak host memory "
               f"{format_bytes(peak)})")


@app.command("make-tiny")
def make_tiny(
    kind: Annotated[str, typer.Argument(help="mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 "
                                             "or deepseek_v3.")],
    out: Annotated[str, typer.Argument(help="Folder to write the checkpoint into.")],
    seed: int = 0,
) -> None:
    """Write a tiny random checkpoint of an architecture with transformers (for tests and demos)."""
    from moe_core.tiny_checkpoints import build_tiny_checkpoint

    folder = build_tiny_checkpoint(kind, out, seed=seed)
    _err.print(f"wrote a tiny {kind} checkpoint to {folder}")


@app.command()
def verify(
    model: Annotated[str, typer.Argument(
        help="Checkpoint folder, hub id, or tiny-moe (the embedded model).")] = TINY_MODEL_NAME,
    batch: Annotated[int, typer.Option(min=1)] = 3,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 16,
    new_tokens: Annotated[int, typer.Option(min=1)] = 16,
    tolerance: Annotated[float, typer.Option(min=0.0)] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare our logits and greedy tokens with transformers' on this checkpoint (fp32, CPU)."""
    from moe_core.verification import verify_against_transformers

    report = verify_against_transformers(resolve_model_path(model), batch=batch,
                                         prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                                         tolerance=tolerance)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
        Console().print(f"{verdict} logits relative error {report.relative_error:.2e} "
                        f"(tolerance {report.tolerance:.0e}); greedy tokens "
                        f"{'match' if report.tokens_match else 'differ'} over "
                        f"{report.new_tokens} new tokens x {report.batch} prompts")
    if not report.passed:
        raise typer.Exit(1)


_add_training_commands()
