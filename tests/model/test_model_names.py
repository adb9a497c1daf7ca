"""config.py's literal smp / timm names equal what the installed packages accept (so they cannot drift)."""
from __future__ import annotations

import inspect

from cityseg.config import model_names


def test_architectures_are_smps_classes_as_smp_spells_them():
    import segmentation_models_pytorch as smp

    classes = sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())
    assert sorted(model_names.ARCHITECTURES) == classes, f"ARCHITECTURES = {tuple(classes)!r}"
    assert all(inspect.isclass(getattr(smp, name)) for name in model_names.ARCHITECTURES)


def test_encoders_are_smps_and_timms_lists():
    import timm
    from segmentation_models_pytorch.encoders import get_encoder_names

    assert model_names.SMP_ENCODERS == set(get_encoder_names()), sorted(set(get_encoder_names()) ^
                                                                         model_names.SMP_ENCODERS)
    assert model_names.TIMM_MODELS == set(timm.list_models()), sorted(set(timm.list_models()) ^
                                                                      model_names.TIMM_MODELS)[:20]
