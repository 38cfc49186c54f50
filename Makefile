# The two set-up commands of the README: `make run` and `make test`.
# Needs only Python 3.11+ and make: uv is used from PATH, or installed into .tools/ on first use.

UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: setup run test lint clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

setup: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --all-packages --locked

# The main job on the embedded tiny MoE (the default model of every command): its plan for a
# small GPU budget, a check against transformers, and generations from a story, a chat turn and
# code. (moe-gen's batch job takes this over once it lands.)
run: setup
	$(UV) run moe-core inspect --gpu-memory 16MiB
	$(UV) run moe-core verify
	$(UV) run moe-core generate --max-new-tokens 48 -p "Once upon a time, there was a little fox who" -p "def fibonacci(n):"
	$(UV) run moe-core generate --chat --max-new-tokens 64 -p "Tom has 3 apples and buys 5 more. How many apples does he have now?"

# The type checker first (zero errors over every package's source), then every test.
test: setup
	$(UV) run mypy
	HF_HUB_OFFLINE=1 $(UV) run pytest

lint: setup
	$(UV) run ruff check .
	$(UV) run mypy

clean:
	rm -rf .cache .tools .venv
