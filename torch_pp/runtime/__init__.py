"""Where the stages meet the wire: the start-up agreement, rank 0's driver (sending, reply
routing, lanes) and the other ranks' serve loop.
"""
