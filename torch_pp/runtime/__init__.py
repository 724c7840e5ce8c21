"""Where the stages meet the wire: the start-up agreement, the activations' encoding, and the other
ranks' serve loop (rank 0's side of the ring is ``rank0``).
"""
