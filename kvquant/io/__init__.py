"""Files and offline assets: atomic writes, model fingerprints, wheels from PyPI, the offline models
and text, token windows."""
