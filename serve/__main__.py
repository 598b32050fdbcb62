"""``python -m neuron_llm.serve``: the same as the ``serve`` command of a SageMaker container."""

from neuron_llm.serve.cli import sagemaker_main

sagemaker_main()
