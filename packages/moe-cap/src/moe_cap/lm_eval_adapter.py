"""An lm-evaluation-harness model backed by our engines: `moe-cap` in lm-eval's registry.

lm-eval is an optional extra (`pip install "moe-cap[lm-eval]"`); it is imported only by
`register()`:

```python
from moe_cap.lm_eval_adapter import register
import lm_eval

register()
results = lm_eval.simple_evaluate(model="moe-cap",
                                  model_args="engine=moe-infinity,model=tiny-moe",
                                  tasks=["my_local_task"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path="tasks/"))
```

Any task whose data is available locally (a task YAML with `dataset_path: json` and
`data_files`) runs on moe-gen's or moe-infinity's model.
"""

from __future__ import annotations

import importlib
from typing import Any

from moe_cap.engine_options import EngineOptions
from moe_cap.errors import TargetError
from moe_cap.lm_backend import EngineLMBackend

__all__ = ["MODEL_NAME", "register"]

MODEL_NAME = "moe-cap"
_registered: list[type] = []


def _lm_eval() -> Any:
    try:
        return importlib.import_module("lm_eval.api.registry"), importlib.import_module(
            "lm_eval.api.model")
    except ImportError:
        raise TargetError('the lm-eval adapter needs lm-eval: pip install "moe-cap[lm-eval]"'
                          ) from None


def register() -> type:
    """Define the `LM` subclass and register it as `moe-cap` (once); returns the class.

    Raises:
        TargetError: lm-eval is not installed.
    """
    if _registered:
        return _registered[0]
    registry, model = _lm_eval()

    @registry.register_model(MODEL_NAME)
    class MoECapLM(model.LM):  # type: ignore[name-defined]
        """lm-eval's view of a moe-cap in-process engine (model_args: engine, model, device,
        dtype, dummy, num_layers, max_gen_toks)."""

        def __init__(self, engine: str = "moe-infinity", model: str = "tiny-moe",
                     device: str = "cpu", dtype: str | None = None, dummy: bool = False,
                     num_layers: int | None = None, max_gen_toks: int = 256,
                     **_: object) -> None:
            super().__init__()
            options = EngineOptions(engine=engine, model=model, device=device, dtype=dtype,
                                    dummy=bool(dummy), num_layers=None if num_layers is None
                                    else int(num_layers))
            self.backend = EngineLMBackend.load(options, int(max_gen_toks))

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                          ) -> list[tuple[float, bool]]:
            return [self.backend.loglikelihood(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                                  ) -> list[float]:
            return [self.backend.loglikelihood_rolling(r.args[0]) for r in requests]

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(self.backend.generate_until(context, until,
                                                       kwargs.get("max_gen_toks")))
            return out

    _registered.append(MoECapLM)
    return MoECapLM
