# The two set-up commands of the README: `make run` and `make test`.
# Needs only Python 3.11+ and make: uv is used from PATH, or installed into .tools/ on first use.

UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
TINY := .cache/tiny-mixtral

.PHONY: setup run test lint clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

setup: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --all-packages --locked

# The main job. Until the embedded tiny model lands (issue #3) it builds a tiny random Mixtral
# checkpoint with transformers, shows its plan, and checks our runtime against transformers on it.
run: setup
	$(UV) run moe-core make-tiny mixtral $(TINY)
	$(UV) run moe-core inspect $(TINY) --gpu-memory 64KiB
	$(UV) run moe-core verify $(TINY)

test: setup
	HF_HUB_OFFLINE=1 $(UV) run pytest

lint: setup
	$(UV) run ruff check .

clean:
	rm -rf .cache .tools .venv
