"""Building blocks of the model, each computed exactly as transformers computes it."""
