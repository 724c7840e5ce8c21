"""Everything about the wire and the peers: the link interface and its Gloo implementation, the
rendezvous (store, hellos), framing, liveness, machine identity and ``doctor``.

The only package that imports ``torch.distributed``; it never touches model math.
"""
