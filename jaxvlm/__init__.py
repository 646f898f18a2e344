"""jaxvlm: offline inference of vision-language models (LLaVA) in JAX, with LMDeploy's pipeline API."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that owns each. Imported lazily so that `import jaxvlm` stays cheap and the
# config objects work without initialising a JAX backend.
_EXPORTS = {
    "pipeline": "jaxvlm.api",
    "Pipeline": "jaxvlm.api",
    "GenerationConfig": "jaxvlm.config",
    "EngineConfig": "jaxvlm.config",
    "TurbomindEngineConfig": "jaxvlm.config",
    "PytorchEngineConfig": "jaxvlm.config",
    "VisionConfig": "jaxvlm.config",
    "Response": "jaxvlm.config",
    "ChatTemplateConfig": "jaxvlm.chat_template",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxvlm' has no attribute {name!r}")
