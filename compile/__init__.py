"""Ahead of time: each bucket's step graph exported as HLO, the input neuronx-cc compiles to a NEFF."""
