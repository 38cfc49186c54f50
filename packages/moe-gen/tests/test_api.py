"""The Python API on the embedded model: text prompts through the tokenizer, stop strings cut the
text and say "stop", sampling is reproducible per request whatever the batch, and a CUDA run gives
the CPU's greedy tokens (GPU machine only)."""

from __future__ import annotations

import gc

import pytest
import torch
from moe_core import MoEForCausalLM, load_model, load_tokenizer, tiny_model_path
from moe_gen import GenRequest, Plan, generate

PROMPTS = ["Once upon a time", "The cat sat on the", "def add(a, b):"]


@pytest.fixture(scope="module")
def model() -> MoEForCausalLM:
    return load_model(tiny_model_path(), dtype="float32")


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return load_tokenizer(tiny_model_path())


def small_plan(batch: int) -> Plan:
    return Plan(max_batch_size=batch, micro_batch_size=2, max_prefill_tokens=64, page_tokens=8,
                num_kv_pages=8 * batch, offload=False)


def test_text_prompts_decode_to_text(model: MoEForCausalLM, tokenizer: object) -> None:
    results = generate(model, PROMPTS, max_new_tokens=8, tokenizer=tokenizer, eos_token_id=[])
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.prompt_tokens == len(tokenizer.encode(prompt))  # type: ignore[attr-defined]
        assert result.text == tokenizer.decode(  # type: ignore[attr-defined]
            list(result.token_ids), skip_special_tokens=True)
        assert result.finish_reason == "length" and result.completion_tokens == 8


def test_stop_string_cuts_the_text(model: MoEForCausalLM, tokenizer: object) -> None:
    free = generate(model, PROMPTS[:1], max_new_tokens=12, tokenizer=tokenizer,
                    eos_token_id=[])[0]
    assert free.text is not None and len(free.text.strip()) > 3
    stop = free.text.strip()[2:4]
    cut = generate(model, PROMPTS[:1], max_new_tokens=12, tokenizer=tokenizer, eos_token_id=[],
                   stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.completion_tokens < free.completion_tokens


def test_sampling_is_reproducible_per_request(model: MoEForCausalLM,
                                              tokenizer: object) -> None:
    def run(batch: int) -> list[tuple[int, ...]]:
        results = generate(model, PROMPTS, max_new_tokens=10, tokenizer=tokenizer,
                           temperature=1.0, top_p=0.9, seed=7, eos_token_id=[],
                           plan=small_plan(batch))
        return [r.token_ids for r in results]

    assert run(3) == run(3)
    assert run(1) == run(3)  # each request has its own generator: the batch does not matter
    greedy = [r.token_ids for r in generate(model, PROMPTS, max_new_tokens=10,
                                            tokenizer=tokenizer, eos_token_id=[])]
    assert run(3) != greedy


def test_per_request_limits(model: MoEForCausalLM) -> None:
    requests = [GenRequest("a", token_ids=(5, 6, 7), max_new_tokens=2),
                GenRequest("b", token_ids=(8, 9), max_new_tokens=5)]
    a, b = generate(model, requests, max_new_tokens=50, eos_token_id=[])
    assert (a.id, a.completion_tokens, b.id, b.completion_tokens) == ("a", 2, "b", 5)


@pytest.mark.gpu
@pytest.mark.parametrize(("share", "kv_gather"), [(0.5, "staged"), (0.5, "mapped"), (0.0, "auto"),
                                                  (0.0, "mapped")])
def test_cuda_matches_cpu_greedy(model: MoEForCausalLM, share: float, kv_gather: str) -> None:
    from moe_gen.model_setup import install_streaming

    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    expected = [r.token_ids for r in generate(model, prompts, max_new_tokens=8,
                                              eos_token_id=[])]
    plan = Plan(max_batch_size=3, micro_batch_size=2, max_prefill_tokens=8, page_tokens=4,
                num_kv_pages=12, num_resident_experts=20, cpu_attention_share=share,
                kv_gather=kv_gather)
    cuda = install_streaming(load_model(tiny_model_path(), dtype="float32"), plan, "cuda")
    got = [r.token_ids for r in generate(cuda.model, prompts, max_new_tokens=8,
                                         eos_token_id=[], plan=plan)]
    assert got == expected
    assert torch.cuda.is_available()


@pytest.mark.gpu
def test_dummy_weights_drawn_on_the_gpu_land_on_the_host() -> None:
    from moe_gen.model_setup import load_for_generation

    gc.collect()  # earlier tests' garbage must not be freed inside the measured span
    before = torch.cuda.memory_allocated()
    model = load_for_generation(tiny_model_path(), "cuda", torch.bfloat16, dummy=True)
    on_host = load_model(tiny_model_path(), "cpu", torch.bfloat16, dummy=True)
    ours, theirs = dict(model.named_parameters()), dict(on_host.named_parameters())
    assert {n: (p.shape, p.dtype) for n, p in ours.items()} == {
        n: (p.shape, p.dtype) for n, p in theirs.items()}
    assert all(p.device.type == "cpu" for p in ours.values())
    gc.collect()
    assert torch.cuda.memory_allocated() == before  # nothing left behind on the GPU
