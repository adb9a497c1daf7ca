"""Label schemes against torchvision's table and against the blog recipe's own encode_segmap loop."""
import numpy as np
import torch
from torchvision.datasets import Cityscapes

from cityseg.bench import seed_encode_segmap  # the recipe's own loop, as the seed-style pipeline runs it
from cityseg.labels import (IGNORE_INDEX, class_names, colorize, known_label_ids, label_lut, num_classes,
                            palette, to_label_ids_lut)


def test_trainid19_follows_torchvision_table():
    lut = label_lut("trainid19")
    for c in Cityscapes.classes:
        expected = IGNORE_INDEX if c.ignore_in_eval else c.train_id
        assert lut[c.id % 256] == expected, c.name
    assert num_classes("trainid19") == 19
    assert class_names("trainid19")[0] == "road" and class_names("trainid19")[-1] == "bicycle"
    assert sorted(set(lut.tolist()) - {IGNORE_INDEX}) == list(range(19))


def test_every_table_id_is_known_and_others_are_not():
    known = known_label_ids()
    assert known[[c.id % 256 for c in Cityscapes.classes]].all()
    assert known.sum() == len(Cityscapes.classes)  # 34 ids 0..33 plus -1 stored as 255


def test_seed20_equals_the_recipe_loop_on_random_label_maps():
    rng = np.random.default_rng(0)
    lut = label_lut("seed20")
    ids = np.array([c.id % 256 for c in Cityscapes.classes], dtype=np.uint8)
    for _ in range(5):
        raw = rng.choice(ids, size=(37, 53)).astype(np.uint8)
        reference = seed_encode_segmap(torch.from_numpy(raw.astype(np.int64))).numpy()
        np.testing.assert_array_equal(lut[raw], reference)
    assert num_classes("seed20") == 20 and class_names("seed20")[0] == "unlabelled"


def test_colorize_is_the_official_colour_of_each_class():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 19, size=(256, 512)).astype(np.uint8)
    mask[:3] = IGNORE_INDEX
    rgb = colorize(mask)
    by_train_id = {c.train_id: c.color for c in Cityscapes.classes if not c.ignore_in_eval}
    for train_id, colour in by_train_id.items():
        assert (rgb[mask == train_id] == colour).all()
    assert (rgb[:3] == 0).all()
    assert palette("seed20")[0].tolist() == [0, 0, 0] and palette("seed20")[1].tolist() == [128, 64, 128]


def test_train_ids_map_back_to_official_label_ids():
    for scheme in ("trainid19", "seed20"):
        forward, back = label_lut(scheme), to_label_ids_lut(scheme)
        for c in Cityscapes.classes:
            if not c.ignore_in_eval:
                assert back[forward[c.id]] == c.id
