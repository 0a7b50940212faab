"""Core ML export of MLX decoders: build (MIL), export (package + side files), validate.

Importing coremltools on Linux logs warnings about its macOS-only runtime libraries and about
untested torch versions; an exporter that never runs models here only needs to build and save,
so those import-time messages are silenced (errors still show).
"""

import logging

_coremltools_logger = logging.getLogger("coremltools")
_level = _coremltools_logger.level
_coremltools_logger.setLevel(logging.ERROR)
try:
    import coremltools  # noqa: F401
finally:
    _coremltools_logger.setLevel(_level)
