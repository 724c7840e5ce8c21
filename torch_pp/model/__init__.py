"""One stage's model: loading this rank's tensors into the HF skeleton, the stage's math (its own
layers with their caches, slots and captured steps, the last stage's rows of a split head), and
merging per-layer outputs.

Never touches the network, and never rank 0's hooks: those are ``rank0``'s.
"""
