"""The live runtime: aiohttp processes around the core objects, time = ``loop.time()``.

The node (``node.py``), the balancer (``balancer.py``, proxying over ``upstream.py``)
and the registry (``registry.py``, with the node's side in ``discovery.py``); the
load generator (``loadgen.py``), the process supervisor (``cluster.py``) and
``run.py``, which runs a scenario for real with them.
"""
