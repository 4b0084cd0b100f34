"""Pruning: masks (magnitude, Wanda, N:M), SparseGPT's mask-and-update, and structured head/neuron removal.

`unstructured` zeroes weights inside the existing shapes (stored dense with zeros); `structured` removes whole
attention heads (KV groups) and MLP neurons and returns a smaller dense model. `leangpt.prune` is the command.
"""
