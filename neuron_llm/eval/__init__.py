"""Measuring a model's quality: sliding-window perplexity (``perplexity``) and greedy agreement
between weight formats (``agreement``), and the ``eval`` command (``cli``)."""
