"""`moe-infinity serve` and `moe-infinity chat`: the serving engine (continuous batching over an
offloaded model, one engine thread) and its front ends (OpenAI-compatible HTTP, terminal chat).
See docs/moe-infinity.md and docs/decisions/0008-serving-engine.md."""
