"""The live runtime: aiohttp node, registry and load balancer around the core objects (to come)."""
