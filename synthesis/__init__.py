"""MR -> synthetic CT: networks, model files, volumes, inference and DICOM writers.

Three layers (DICOM -> volume, volume -> volume, volume -> DICOM); nothing here
knows about the node, its settings or its database.
"""

from pathlib import Path

__version__ = "0.1.0"

# What mr2ct calls itself in DICOM (PS3.7 D.3.3.2, PS3.10 7.1): in every file's meta information
# and every association it negotiates. The class UID is a 2.25 UID (PS3.5 B.2: the decimal value
# of UUID 04ac07b6-b58a-4dc3-a422-bb31e88b2944, made once for mr2ct; no registered root needed)
# and stays as it is; the version name says which release wrote or sent (16 characters at most).
IMPLEMENTATION_CLASS_UID = "2.25.6210143495384442773456656261301610820"
IMPLEMENTATION_VERSION_NAME = "MR2CT_" + __version__.replace(".", "")


def default_model_path() -> Path:
    """The model shipped with mr2ct (trained on phantoms by training/recipes/phantom_1mm.sh). Here,
    not in ``model_file``, so that reading the settings does not import torch."""
    return Path(__file__).resolve().parent / "models" / "mr2ct-phantom.safetensors"
