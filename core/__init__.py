"""What both Flower apps share: the run config, the wire format, data, model, presets, trainer.

Imports ``aggregation`` and third-party libraries only; knows nothing of Flower's server or
client side, of privacy, or of the command line.
"""
