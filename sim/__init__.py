"""The SimPy model: processes around the same core objects, time = env.now (to come)."""
