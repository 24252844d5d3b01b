"""The device a node runs on: its readings, the ``[device]`` policy, and simulated devices.

``readings`` (what the device reports, and the overrides), ``sources`` (psutil, or an
application's own), ``config`` (the ``[device]`` section), ``policy`` (sans-IO: readings in, a
decision out), ``service`` (the trio driver on the node: ``node.device``), ``simulator``
(phones, IoT boards, laptops, servers for simulations and testnets), ``probe`` (what the
machine is, for the peer record).
"""
