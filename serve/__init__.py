"""The HTTP server: OpenAI-compatible and SageMaker routes, health and Prometheus metrics.

    neuron-llm serve path/to/model --port 8000        # flags
    NEURON_LLM_MODEL=path/to/model serve              # environment (containers), 0.0.0.0:8080

``create_app(ServeSettings(...))`` builds the FastAPI app for embedding or tests.
"""

from neuron_llm.serve.app import create_app
from neuron_llm.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
