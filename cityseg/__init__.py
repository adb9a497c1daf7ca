"""cityseg: distributed semantic segmentation training on Cityscapes."""

__version__ = "0.1.0"
