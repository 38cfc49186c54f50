"""The step interface, the static KV cache and the decode runner.

On the CPU (CI) the runner runs its step eagerly: that checks everything graph capture relies on
(static shapes, device-side slot counting, masks over the whole capacity, bucket padding rows)
except the capture itself, which the `gpu` tests check against eager decoding.

Dimension key: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from moe_core import (
    TINY_KINDS,
    KVCache,
    MoEForCausalLM,
    StaticKVCache,
    build_tiny_checkpoint,
    load_model,
    tiny_model_path,
)
from moe_core.decode_runner import DecodeRunner, bucket_for, graph_blockers
from moe_core.model import attention_mask_for
from moe_core.tiny_checkpoints import ragged_batch

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    **{kind: (kind, {}) for kind in TINY_KINDS},
    "mixtral-sliding_window": ("mixtral", {"sliding_window": 4}),
}
VOCAB = 96


@pytest.fixture(scope="module", params=list(CASES))
def model(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> MoEForCausalLM:
    kind, overrides = CASES[request.param]
    folder = build_tiny_checkpoint(kind, tmp_path_factory.mktemp(request.param), **overrides)
    return load_model(folder, dtype="float32")


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _new_tokens(seed: int, batch: int = 3, width: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, width), generator=torch.Generator().manual_seed(seed))


# --- The step interface -----------------------------------------------------------------------


def module_walk_forward(model: MoEForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                        cache: KVCache | None) -> torch.Tensor:
    """The forward pass as it was written before the step interface: a walk over the modules."""
    new_valid = mask.to(torch.bool)
    start = cache.next_position if cache is not None else torch.zeros(ids.shape[0],
                                                                      dtype=torch.long)
    positions = start[:, None] + (new_valid.long().cumsum(dim=1) - 1).clamp(min=0)
    h = model.model.embed_tokens(ids)
    key_valid = cache.key_valid(new_valid) if cache is not None else new_valid
    num_past = cache.num_slots if cache is not None else 0
    full = attention_mask_for(key_valid, num_past, ids.shape[1], None, h.dtype)
    window = attention_mask_for(key_valid, num_past, ids.shape[1],
                                model.spec.attention.sliding_window, h.dtype)
    rope = model.rotary(positions, h.dtype)
    for i, layer in enumerate(model.model.layers):
        m = window if i in model.spec.sliding_layers else full
        h = h + layer.self_attn(layer.input_layernorm(h), rope, m, cache)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    if cache is not None:
        cache.commit(new_valid)
    return model.lm_head(model.model.norm(h))


@torch.no_grad()
def test_step_interface_forward_is_bitwise_the_module_walk(model: MoEForCausalLM) -> None:
    """Prefill and decode through `forward` (embed, attend, mix, logits) give exactly the logits
    of the old module walk (MLA decode set to the expanded form the walk used)."""
    for layer in model.layers:
        if hasattr(layer.self_attn, "absorb_at_decode"):
            layer.self_attn.absorb_at_decode = False
    try:
        ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
        ours, theirs = model.new_cache(3, 13), model.new_cache(3, 13)
        assert torch.equal(model(ids, attention_mask=mask, cache=ours),
                           module_walk_forward(model, ids, mask, theirs))
        for seed in range(3):
            token = _new_tokens(seed)
            one = torch.ones_like(token)
            assert torch.equal(model(token, cache=ours),
                               module_walk_forward(model, token, one, theirs))
    finally:
        for layer in model.layers:
            if hasattr(layer.self_attn, "absorb_at_decode"):
                layer.self_attn.absorb_at_decode = True


# --- The static cache -------------------------------------------------------------------------


@torch.no_grad()
def test_static_cache_decodes_like_the_growing_cache(model: MoEForCausalLM) -> None:
    """Prefill, a chunk of 3, then single tokens with a row sitting out two steps: the static
    cache (all slots attended, the empty ones masked) gives the growing cache's logits."""
    ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
    new = _new_tokens(1, width=9)
    new_mask = torch.ones_like(new)
    new_mask[0, 4:6] = 0
    growing, static = model.new_cache(3, 4), StaticKVCache(3, 40)
    passes = [(ids, mask), (new[:, :3], new_mask[:, :3])]
    passes += [(new[:, i : i + 1], new_mask[:, i : i + 1]) for i in range(3, new.shape[1])]
    for chunk, chunk_mask in passes:
        want = model(chunk, attention_mask=chunk_mask, cache=growing)
        got = model(chunk, attention_mask=chunk_mask, cache=static)
        real = chunk_mask.bool()  # padding queries attend to nothing: their output is filler
        assert relative_error(got[real], want[real]) < 1e-5
    assert int(static.slot) == growing.num_slots
    assert torch.equal(static.next_position, growing.next_position)
    assert torch.equal(static.valid[:, : growing.num_slots], growing.valid[:, : growing.num_slots])
    assert not static.valid[:, growing.num_slots :].any()


def test_static_cache_rows_share_buffers_and_slot() -> None:
    cache = StaticKVCache(4, 8)
    view = cache.rows(2)
    new_valid = torch.ones(2, 3, dtype=torch.bool)
    view.begin(new_valid)
    (keys,) = view.append(0, torch.arange(2 * 3 * 5.0).view(2, 3, 5))
    view.commit(new_valid)
    assert keys.shape == (2, 8, 5)
    assert int(cache.slot) == 3 and cache.valid[:2, :3].all() and not cache.valid[2:].any()
    assert cache.nbytes() == 4 * 8 * 5 * 4  # allocated once at full size
    saved = view.state()
    view.begin(new_valid[:, :1])
    view.append(0, torch.ones(2, 1, 5))
    view.commit(new_valid[:, :1])
    assert int(cache.slot) == 4
    view.restore(saved)  # a warm-up run leaves no trace in the fill state
    assert int(cache.slot) == 3 and not cache.valid[:, 3].any()
    assert torch.equal(cache.next_position, torch.tensor([3, 3, 0, 0]))
    cache.reset()
    assert int(cache.slot) == 0 and not cache.valid.any()
    with pytest.raises(ValueError, match="rows"):
        cache.rows(5)
    with pytest.raises(RuntimeError, match="begin"):
        cache.append(0, torch.zeros(4, 1, 5))


# --- The runner (eager on the CPU) ------------------------------------------------------------


@torch.no_grad()
def test_runner_steps_match_eager_decoding(model: MoEForCausalLM) -> None:
    """Batch 3 runs in bucket 4 (a padding row): every step's logits equal eager decoding's, also
    after a row is made inactive."""
    ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
    runner = DecodeRunner(model, 3, 40)
    assert runner.max_rows == 4 and not runner.use_graphs
    cache = model.new_cache(3, 40)
    want = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    got = runner.prefill(ids, mask)
    assert relative_error(got, want) < 1e-5
    active = torch.ones(3, dtype=torch.bool)
    for i in range(6):
        if i == 3:
            active[1] = False
        token = want.argmax(dim=-1)
        got, greedy = runner.step(token, active)
        want = model(token[:, None], attention_mask=active[:, None].long(), cache=cache,
                     last_only=True)[:, -1]
        assert relative_error(got[active], want[active]) < 1e-5
        assert torch.equal(greedy, got.argmax(dim=-1))
    assert runner.num_slots == 12 + 6


def test_runner_refuses_what_does_not_fit(model: MoEForCausalLM) -> None:
    runner = DecodeRunner(model, 2, 13)
    ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        runner.prefill(ids, mask)  # 3 rows in a runner of bucket 2
    runner.prefill(ids[:2], mask[:2])
    runner.step(torch.tensor([5, 6]), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="full"):
        runner.step(torch.tensor([5, 6]), torch.ones(2, dtype=torch.bool))


def test_runner_forgets_its_graphs_when_the_blocks_change(model: MoEForCausalLM) -> None:
    """A captured step replays the executor it captured: installing another one (or a routing
    override) must drop the graphs before the next batch."""
    runner = DecodeRunner(model, 1, 16)
    ids = torch.tensor([[5, 6, 7]])
    runner.prefill(ids, torch.ones_like(ids))
    runner._graphs[1] = object()  # type: ignore[assignment]  # stands in for a capture
    runner.prefill(ids, torch.ones_like(ids))
    assert 1 in runner._graphs  # nothing changed: kept
    block = model.moe_blocks()[0]
    block.routing_override = lambda hidden: block.gate(hidden)
    try:
        runner.prefill(ids, torch.ones_like(ids))
    finally:
        block.routing_override = None
    assert not runner._graphs


def test_buckets() -> None:
    assert [bucket_for(b) for b in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 65]


def test_graph_blockers_name_what_prevents_capture(model: MoEForCausalLM) -> None:
    assert any("not CUDA" in r for r in graph_blockers(model))
    block = model.moe_blocks()[0]
    block.observer = lambda layer, ids, weights: None
    model.layers[0].mix_observer = lambda layer, h, x: None
    try:
        reasons = graph_blockers(model)
    finally:
        block.observer = None
        model.layers[0].mix_observer = None
    assert any("routing observer" in r for r in reasons)
    assert any("mix observer" in r for r in reasons)
    with pytest.raises(ValueError, match="impossible"):
        model.generate([[5, 6, 7]], max_new_tokens=2, graphs=True)


def test_generation_stops_and_pads_the_same_with_the_one_step_lag(model: MoEForCausalLM) -> None:
    """`generate` launches step i+1 before checking token i: a row that stops early still gets
    exactly the eager result (its extra step is discarded)."""
    ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 1])
    result = model.generate_full(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos)
    for row in range(3):
        stop = next((i for i, t in enumerate(free[row].tolist()) if t == eos), None)
        if stop is None:
            assert result.tokens[row].tolist() == free[row].tolist()
            continue
        assert result.lengths[row] == stop + 1 and result.finish_reasons[row] == "eos"
        assert result.tokens[row, : stop + 1].tolist() == free[row, : stop + 1].tolist()


# --- MLA weight absorption --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["deepseek_v2", "deepseek_v3"])
@torch.no_grad()
def test_absorbed_mla_decode_matches_the_expanded_form(kind: str, tmp_path: Any) -> None:
    model = load_model(build_tiny_checkpoint(kind, tmp_path), dtype="float32")
    ids, mask = ragged_batch((12, 8, 5), 12, "left", seed=0)
    runs = []
    for absorb in (True, False):
        for layer in model.layers:
            layer.self_attn.absorb_at_decode = absorb
        cache = model.new_cache(3, 20)
        model(ids, attention_mask=mask, cache=cache)
        runs.append(torch.cat([model(_new_tokens(s), cache=cache) for s in range(6)], dim=1))
    absorbed, expanded = runs
    assert relative_error(absorbed, expanded) < 1e-4
    assert not torch.equal(absorbed, expanded)  # the absorbed form really ran


# --- GPU: captured graphs against eager decoding ----------------------------------------------


def greedy(runner: DecodeRunner, ids: torch.Tensor, mask: torch.Tensor,
           new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy tokens per row `[B, N]` through `runner`, every row active."""
    logits = runner.prefill(ids, mask)
    active = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    out = []
    for i in range(new_tokens):
        token = logits.argmax(dim=-1)
        out.append(token)
        if i + 1 < new_tokens:
            logits, _ = runner.step(token, active)
    return torch.stack(out, dim=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_gives_eager_greedy_tokens(model: MoEForCausalLM, dtype: str) -> None:
    """The captured step replayed gives the tokens of the same step run eagerly, at buckets 1, 4
    and 8; `generate` (graphs by default on CUDA) gives them too, and in float32 they are the
    tokens of eager decoding with the growing cache."""
    assert model.source is not None
    net = load_model(model.source, device="cuda", dtype=dtype)
    for batch in (1, 3, 5):  # buckets 1, 4 and 8
        ids, mask = ragged_batch((12, 8, 5, 9, 11)[:batch], 12, "left", seed=batch)
        ids, mask = ids.cuda(), mask.cuda()
        eager = greedy(DecodeRunner(net, batch, 48, use_graphs=False), ids, mask, 24)
        runner = DecodeRunner(net, batch, 48)
        graph = greedy(runner, ids, mask, 24)
        assert runner.use_graphs and sorted(runner._graphs) == [bucket_for(batch)]
        assert graph.tolist() == eager.tolist(), f"batch {batch}"
        generated = net.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
        assert generated.tolist() == graph.tolist()
        if dtype == "float32":
            plain = net.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[],
                                 graphs=False)
            assert plain.tolist() == graph.tolist()


@pytest.mark.gpu
def test_graph_replay_logits_stay_close_to_eager_on_the_embedded_model() -> None:
    net = load_model(tiny_model_path(), device="cuda", dtype="bfloat16")
    ids = torch.tensor([[1, 400, 37, 901, 12, 77, 5]], device="cuda")
    mask = torch.ones_like(ids)
    cache = net.new_cache(1, 64)
    runner = DecodeRunner(net, 1, 64)
    with torch.no_grad():
        want = net(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
        got = runner.prefill(ids, mask)
        for _ in range(16):
            token = want.argmax(dim=-1)
            got, _ = runner.step(token, torch.ones(1, dtype=torch.bool, device="cuda"))
            want = net(token[:, None], cache=cache, last_only=True)[:, -1]
            assert relative_error(got.float(), want.float()) < 2e-2
    eager = greedy(DecodeRunner(net, 1, 64, use_graphs=False), ids, mask, 48)
    assert greedy(DecodeRunner(net, 1, 64), ids, mask, 48).tolist() == eager.tolist()


@pytest.mark.gpu
def test_offloaded_mapped_graph_steps_count_every_use() -> None:
    """Captured steps through the mapped offload path: the same tokens as the eager step, and
    every replayed step's expert uses counted (no host read per layer in either)."""
    from moe_core import GpuSlotPool, HostExpertStore, install_offloading, make_copy_engine

    net = load_model(tiny_model_path(), device="cuda", dtype="bfloat16")
    store = HostExpertStore.from_model(net, pin=True)
    pool = GpuSlotPool(store.layout, len(store.experts()) // 3, device="cuda")
    runtime = install_offloading(net, store, pool, make_copy_engine("cuda"), fetch="mapped",
                                 drop_local_experts=True)
    runtime.prefetch(store.experts()[: pool.num_slots])
    runtime.drain()
    ids = torch.tensor([[1, 400, 37, 901, 12, 77, 5]], device="cuda")
    mask = torch.ones_like(ids)
    eager = greedy(DecodeRunner(net, 1, 64, use_graphs=False), ids, mask, 20)
    before = runtime.snapshot(block=True)
    runner = DecodeRunner(net, 1, 64)
    graph = greedy(runner, ids, mask, 20)
    after = runtime.snapshot(block=True)
    assert runner._graphs and graph.tolist() == eager.tolist()
    top_k = net.spec.moe.router.top_k
    decode_uses = 19 * len(net.moe_blocks()) * top_k  # one token per step: distinct experts
    prefill_uses = (after.expert_uses - before.expert_uses) - decode_uses
    assert 0 < prefill_uses <= len(net.moe_blocks()) * net.spec.moe.num_experts
    assert after.mapped_bytes > before.mapped_bytes
