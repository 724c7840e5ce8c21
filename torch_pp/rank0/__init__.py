"""Rank 0's side of the pipeline: the hooks in its Hugging Face model and what they drive.

Read in this order: ``install`` (every hook, in one place), ``step`` (one forward's state,
passed down as an argument), ``forward`` and ``generate`` (the two model-level hooks),
``placeholders`` (the layers other ranks own), ``ring`` (a step's round of the stages),
``replies``, ``lanes``, ``turn``, ``outbox``, ``local`` and ``head``. The other ranks' side is
``runtime.serve`` over ``model.stage.StageRunner``.
"""
