"""`cityseg predict`: label-id PNGs for the benchmark server, colour maps and overlays, sharded over ranks."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cityseg.checkpoint import load_weights
from cityseg.data.cityscapes import IMAGE_SUFFIX, DataError, read_image
from cityseg.data.loaders import rank_shard
from cityseg.data.normalization import resolve_normalization
from cityseg.data.transforms import eval_transform
from cityseg.distributed.runtime import make_accelerator
from cityseg.evaluation.inference import segment_logits, upsampled_argmax
from cityseg.labels import class_names, colorize, to_label_ids_lut
from cityseg.model.build import build_model

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Three sibling trees, not three files side by side: the official evaluator takes every <city>_<seq>_<frame>*.png
# under CITYSCAPES_RESULTS as a prediction and refuses several per image; labelIds/ is what the server wants zipped.
KINDS = {"labelIds": "_pred_labelIds.png", "color": "_pred_color.png", "overlay": "_pred_overlay.jpg"}


def find_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """PNG / JPEG files under root (any depth), sorted, or root itself when it is one image file; files under
    `exclude` (the output) are not inputs."""
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{root}: not a PNG or JPEG image (--input takes one image file or a folder of them)")
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: input file or directory not found")
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not (exclude is not None and exclude.resolve() in p.resolve().parents)]
    if not found:
        raise DataError(f"{root}: no PNG or JPEG images found")
    seen = {}
    for image in sorted(found):  # photo.png and photo.jpg would write the same prediction files
        key = image.relative_to(root).parent / output_stem(image)
        if key in seen:
            raise DataError(f"{image}: same name as {seen[key]}, so their predictions would overwrite each other")
        seen[key] = image
    return sorted(found)


def output_stem(image: Path) -> str:
    return image.name[: -len(IMAGE_SUFFIX)] if image.name.endswith(IMAGE_SUFFIX) else image.stem


def output_paths(output: Path, relative: Path) -> dict[str, Path]:
    """Where one input image's three files go: <output>/<kind>/<its subfolders>/<stem><suffix>."""
    stem = output_stem(relative)
    return {kind: output / kind / relative.parent / f"{stem}{suffix}" for kind, suffix in KINDS.items()}


class Images(Dataset):
    """Normalized images at their own size, decoded in loader workers."""

    def __init__(self, paths: list[Path], data_cfg):
        self.paths, self.normalize = paths, eval_transform(data_cfg, None)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = read_image(self.paths[index])
        return self.normalize(image=image)["image"], image, index


def write_outputs(paths: dict[str, Path], image: np.ndarray, prediction: np.ndarray, scheme: str) -> None:
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    color = colorize(prediction, scheme)
    overlay = (0.5 * image + 0.5 * color).astype(np.uint8)
    written = [cv2.imwrite(str(paths["labelIds"]), to_label_ids_lut(scheme)[prediction]),
               cv2.imwrite(str(paths["color"]), cv2.cvtColor(color, cv2.COLOR_RGB2BGR)),
               cv2.imwrite(str(paths["overlay"]), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 90])]
    if not all(written):
        raise DataError(f"{paths['labelIds'].parent}: cannot write predictions there")


@torch.inference_mode()
def predict(cfg, weights: str | Path, output: str | Path, split: str | None = None,
            input_dir: str | Path | None = None) -> int:
    """Write the three files of every image of a split (or folder); each rank its own share. Returns the count."""
    resolve_normalization(cfg.data, cfg.model)  # a run's config.yaml records it; a config given by hand: the encoder's
    accelerator = make_accelerator(cfg)
    output = Path(output)
    root = Path(input_dir) if input_dir is not None else Path(cfg.data.root) / "leftImg8bit" / split
    images = find_images(root, exclude=output)
    if root.is_file():  # one image: its three files go straight under <output>/<kind>/
        root = root.parent
    scheme = cfg.data.label_scheme
    model = build_model(cfg.model, len(class_names(scheme)))
    load_weights(model, weights)
    model.to(accelerator.device).eval()
    shard = rank_shard(len(images), accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Images([images[i] for i in shard], cfg.data), batch_size=None,  # sizes differ: no batching
                        num_workers=cfg.data.num_workers)
    for tensor, image, index in loader:
        with accelerator.autocast():
            logits = segment_logits(model, tensor[None].to(accelerator.device), cfg.data.image_size, cfg.eval)
        prediction = upsampled_argmax(logits.float(), image.shape[:2])[0].to(torch.uint8).cpu().numpy()
        relative = images[shard[index]].relative_to(root)
        write_outputs(output_paths(output, relative), image.numpy(), prediction, scheme)
    accelerator.wait_for_everyone()
    return len(images)
