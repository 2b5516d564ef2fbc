"""Qt-free core of the AttentionUNetSeg Slicer extension: network, inference engine, MRML bridge, CLI."""

__version__ = "0.1.0"
