"""Transport implementations (installed as ``meshfed.transports``).

``memory`` is imported eagerly; ``libp2p`` is imported only when used, since importing
py-libp2p costs seconds and tens of MiB.
"""
