"""MR -> synthetic CT: networks, model files, volumes, inference and DICOM writers.

Three layers (DICOM -> volume, volume -> volume, volume -> DICOM); nothing here
knows about the node, its settings or its database.
"""

__version__ = "0.1.0"
