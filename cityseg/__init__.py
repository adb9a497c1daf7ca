"""cityseg: distributed semantic segmentation training on Cityscapes."""

import os

# albumentations checks PyPI for a newer version on import, in every process and loader worker: offline
# compute nodes stall on it. Set before any module imports albumentations; a user's explicit value wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
