"""H-SAM core: the network, its weights, volume I/O and the inference engine.

Importing this package (and ``hsam.data.labels``, ``hsam.description``, ``hsam.errors``) never imports
torch, so a GUI can list models and label sets before torch is installed.
"""

__version__ = "0.1.0"
