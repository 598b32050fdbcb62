"""The HTTP server: OpenAI-compatible and SageMaker routes, health and Prometheus metrics.

    neuron-llm serve path/to/model --port 8000        # flags
    NEURON_LLM_MODEL=path/to/model serve              # environment (containers), 0.0.0.0:8080

``create_app(ServeSettings(...))`` builds the FastAPI app, for embedding or tests.
"""

from neuron_llm.serve.settings import ServeSettings


def __getattr__(name: str) -> object:
    # The app pulls in FastAPI, torch and the engine; import it only when asked for, so that
    # `neuron_llm.serve.cli` stays cheap to import for the command line.
    if name == "create_app":
        from neuron_llm.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'neuron_llm.serve' has no attribute {name!r}")


__all__ = ["ServeSettings", "create_app"]
