"""One stage's model: loading this rank's tensors into the HF skeleton, the stage's math, the
remote placeholders that stand for other stages' layers, and merging their outputs.

Never touches the network: communication is plugged in from outside by ``runtime``.
"""
