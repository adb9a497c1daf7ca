"""Label schemes against the official Cityscapes table (typed here once) and the blog recipe's encode_segmap loop."""
import numpy as np
import torch

from cityseg.bench.throughput import (
    seed_encode_segmap,  # the recipe's own loop, as the seed-style pipeline runs it
)
from cityseg.labels import (
    IGNORE_INDEX,
    class_names,
    colorize,
    known_label_ids,
    label_lut,
    num_classes,
    palette,
    to_label_ids_lut,
)

# cityscapesScripts, cityscapesscripts/helpers/labels.py: (name, id, trainId), all 35 rows. trainId 255 and -1 are
# "not trained on"; labelIds PNGs are uint8, so the license plate's id -1 is stored as 255.
OFFICIAL = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
]
TRAINED = sorted((train_id, name, class_id) for name, class_id, train_id in OFFICIAL if 0 <= train_id < 255)
COLOURS = {"road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
           "fence": (190, 153, 153), "pole": (153, 153, 153), "traffic light": (250, 170, 30),
           "traffic sign": (220, 220, 0), "vegetation": (107, 142, 35), "terrain": (152, 251, 152),
           "sky": (70, 130, 180), "person": (220, 20, 60), "rider": (255, 0, 0), "car": (0, 0, 142),
           "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100), "motorcycle": (0, 0, 230),
           "bicycle": (119, 11, 32)}


def test_the_official_table_as_typed():
    assert len(OFFICIAL) == 35 and sorted(c for _, c, _ in OFFICIAL) == list(range(-1, 34))
    assert [t for t, _, _ in TRAINED] == list(range(19))


def test_trainid19_is_the_official_table():
    lut = label_lut("trainid19")
    for name, class_id, train_id in OFFICIAL:
        expected = train_id if 0 <= train_id < 255 else IGNORE_INDEX
        assert lut[class_id % 256] == expected, (name, class_id)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert num_classes("trainid19") == 19
    assert class_names("trainid19") == [name for _, name, _ in TRAINED]


def test_seed20_is_the_official_table_shifted_by_one_with_void_as_0():
    lut = label_lut("seed20")
    for name, class_id, train_id in OFFICIAL:
        assert lut[class_id % 256] == (train_id + 1 if 0 <= train_id < 255 else 0), (name, class_id)
    assert class_names("seed20") == ["unlabelled", *(name for _, name, _ in TRAINED)]


def test_every_official_id_is_known_and_others_are_not():
    known = known_label_ids()
    assert sorted(np.flatnonzero(known).tolist()) == sorted(class_id % 256 for _, class_id, _ in OFFICIAL)
    for scheme in ("trainid19", "seed20"):  # a value outside the table is never a class
        unknown = np.flatnonzero(~known)
        assert (label_lut(scheme)[unknown] == IGNORE_INDEX).all(), scheme


def test_seed20_equals_the_recipe_loop_on_random_label_maps():
    rng = np.random.default_rng(0)
    lut = label_lut("seed20")
    ids = np.array([class_id % 256 for _, class_id, _ in OFFICIAL], dtype=np.uint8)
    for _ in range(5):
        raw = rng.choice(ids, size=(37, 53)).astype(np.uint8)
        reference = seed_encode_segmap(torch.from_numpy(raw.astype(np.int64))).numpy()
        np.testing.assert_array_equal(lut[raw], reference)
    assert num_classes("seed20") == 20


def test_colorize_is_the_official_colour_of_each_class():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 19, size=(256, 512)).astype(np.uint8)
    mask[:3] = IGNORE_INDEX
    rgb = colorize(mask)
    for train_id, name, _ in TRAINED:
        assert (rgb[mask == train_id] == COLOURS[name]).all(), name
    assert (rgb[:3] == 0).all()
    assert palette("seed20")[0].tolist() == [0, 0, 0] and palette("seed20")[1].tolist() == list(COLOURS["road"])


def test_train_ids_map_back_to_official_label_ids():
    for scheme, offset in (("trainid19", 0), ("seed20", 1)):
        back = to_label_ids_lut(scheme)
        for train_id, name, class_id in TRAINED:
            assert back[train_id + offset] == class_id, (scheme, name)
