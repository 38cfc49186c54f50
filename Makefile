# The two set-up commands of the README: `make run` and `make test`.
# Needs only Python 3.11+ and make: uv is used from PATH, or installed into .tools/ on first use.

UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)

.PHONY: setup run test lint clean

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/python -m pip install --quiet uv

# The ray extra of moe-gen (`moe-gen run --ray`) too, so that its test runs a local Ray cluster.
setup: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --all-packages --locked --extra ray

# The main job on the embedded tiny MoE (the default model of every command): its plan for a
# small GPU budget and a check against transformers, then moe-gen's batch job on the embedded
# sample prompts (a story, a chat turn, code, math), written afresh to .cache/make-run/ with
# its run record, and the results printed.
RUN_OUT := .cache/make-run/out.jsonl

run: setup
	$(UV) run moe-core inspect --gpu-memory 16MiB
	$(UV) run moe-core verify
	mkdir -p .cache/make-run
	rm -f $(RUN_OUT) $(RUN_OUT).run-record.json
	$(UV) run moe-gen run --max-new-tokens 48 --output $(RUN_OUT) --json .cache/make-run/record.json
	cat $(RUN_OUT)

# The type checker first (zero errors over every package's source), then every test.
test: setup
	$(UV) run mypy
	HF_HUB_OFFLINE=1 $(UV) run pytest

lint: setup
	$(UV) run ruff check .
	$(UV) run mypy

clean:
	rm -rf .cache .tools .venv
