"""The SimPy model (``model.py``): the same core objects as the live runtime, time = ``env.now``."""
