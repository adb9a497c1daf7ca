"""Recorded configs of earlier runs: the keys and defaults an older cityseg wrote, read as this one means them."""
from __future__ import annotations

from cityseg.config.schema import IMAGENET_MEAN, IMAGENET_STD, RETIRED


def upgrade_recorded(tree: dict) -> dict:
    """A run's config.yaml from an older cityseg: retired keys dropped, the ImageNet mean / std it trained with."""
    for dotted in RETIRED:
        section, _, leaf = dotted.rpartition(".")
        if isinstance(tree.get(section), dict):
            tree[section].pop(leaf, None)
    data = tree.setdefault("data", {})
    if isinstance(data, dict) and "mean" not in data and "std" not in data:
        data["mean"], data["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return tree
