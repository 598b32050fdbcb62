"""GPU benchmarks, each figure measured beside its anchor in the same run (``neuron-llm bench``).

``anchors`` measures what the card can do (copy bandwidth, bf16 matmul rate); ``engine``
times the engine on a random-weight model of a real shape (Llama-3-8B by default) against
those anchors and against transformers' ``generate``.
"""
