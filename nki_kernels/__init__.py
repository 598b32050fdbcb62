"""NKI kernels for Neuron devices, each beside a NumPy reference of its tiles.

Kernels are reached only through ``neuron_llm.backends.neuron``; none ships yet, and the
``neuron`` backend runs its plain XLA forms of attention and the KV-cache write.
"""
