"""Pretrained encoder weights for offline clusters: the Hugging Face files needed, cache check, `weights fetch`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 5  # the hub answers a HEAD request in well under a second when it can be reached


class WeightsError(RuntimeError):
    """A one-line, user-facing reason the weights could not be fetched or found."""


@dataclass
class HubFile:
    repo_id: str
    filename: str
    revision: str | None  # None = the repository's main branch (refs/main in the cache)


def hub_files(model_cfg) -> list[HubFile]:
    """The hub files smp / timm read for model.encoder with model.encoder_weights (none for null or a local file)."""
    weights, encoder = model_cfg.encoder_weights, model_cfg.encoder
    if weights is None or Path(weights).suffix or "/" in weights:
        return []
    if encoder.startswith("tu-"):  # timm: the variant is in the name; timm prefers the safetensors file
        from timm.models import get_pretrained_cfg

        config = get_pretrained_cfg(encoder[3:])
        if config is None or not config.hf_hub_id:
            raise WeightsError(f"model.encoder: timm has no Hugging Face weights for {encoder[3:]}")
        repo_id, _, revision = config.hf_hub_id.partition("@")
        return [HubFile(repo_id, "model.safetensors", revision or None)]
    from segmentation_models_pytorch.encoders import encoders

    if encoder not in encoders:
        raise WeightsError(f"model.encoder: unknown encoder {encoder!r}")
    settings = encoders[encoder]["pretrained_settings"].get(weights)
    if settings is None:
        raise WeightsError(f"model.encoder_weights: {encoder} has no '{weights}' weights (it has: "
                           f"{', '.join(encoders[encoder]['pretrained_settings'])})")
    return [HubFile(settings["repo_id"], name, settings["revision"]) for name in ("config.json", "model.safetensors")]


def cache_dir() -> Path:
    """Where huggingface_hub reads and writes (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def missing_files(model_cfg, cache: str | Path | None = None) -> list[HubFile]:
    """The files of hub_files() not in the cache; reads only the local disk."""
    from huggingface_hub import try_to_load_from_cache

    return [file for file in hub_files(model_cfg)
            if not isinstance(try_to_load_from_cache(file.repo_id, file.filename, cache_dir=cache,
                                                     revision=file.revision), str)]


def weights_on_disk(model_cfg) -> bool:
    """The encoder can be built with model.encoder_weights from this machine's disk alone: none needed, a local
    file, or every hub file cached."""
    try:
        return not missing_files(model_cfg)
    except WeightsError:
        return False


def hub_offline_reason() -> str | None:
    """Why the Hugging Face Hub cannot be used from this process (None: it can), found out once: HF_HUB_OFFLINE, else
    one HEAD request to the hub's own address (no retries, a short timeout). Offline, huggingface_hub is then put in
    offline mode, here and in the processes this one starts, so loading cached weights asks the hub nothing (it
    would retry each file for ~25 s)."""
    if "reason" not in _HUB:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        if constants.HF_HUB_OFFLINE:
            _HUB["reason"] = "HF_HUB_OFFLINE is set"
        else:
            try:
                get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
                _HUB["reason"] = None
            except Exception as err:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "cannot be reached"
                _HUB["reason"] = f"no connection to {constants.ENDPOINT}: {type(err).__name__}"
                constants.HF_HUB_OFFLINE = True
                os.environ["HF_HUB_OFFLINE"] = "1"
    return _HUB["reason"]


_HUB: dict = {}  # this process's one answer of hub_offline_reason


def describe(model_cfg) -> tuple[bool, str]:
    """(ok, detail) for `cityseg check` and training's start: are the pretrained weights in the local cache, and if
    not, can they be downloaded from here? Asks the hub at most one short question (hub_offline_reason)."""
    try:
        files = hub_files(model_cfg)
    except WeightsError as err:
        return False, str(err)
    if not files:
        return True, "none needed (model.encoder_weights is null or a local file)"
    offline = hub_offline_reason()
    missing = missing_files(model_cfg)
    where = cache_dir()
    if not missing:
        return True, f"{files[0].repo_id} in the Hugging Face cache {where}"
    names = f"{missing[0].repo_id}/{missing[0].filename}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
    if offline is None:
        return True, (f"{names} not in the Hugging Face cache {where}: downloaded from the hub when training starts "
                      "(or now: `cityseg weights fetch --config <config>`)")
    return False, (f"model.encoder_weights: {names} is not in the Hugging Face cache {where} and this machine is "
                   f"offline ({offline}): on a login node run `cityseg weights fetch --config <config>` (same "
                   "HF_HUB_CACHE or --cache-dir on shared disk), then train here with HF_HUB_OFFLINE=1")


def fetch(model_cfg, cache: str | Path | None = None) -> list[Path]:
    """Download the encoder's files into the cache (the default one, or `cache`); returns their local paths."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its per-retry warnings would bury the one line that matters
    files = hub_files(model_cfg)
    if not files:
        return []
    missing = missing_files(model_cfg, cache)
    if missing and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False"):
        raise WeightsError("HF_HUB_OFFLINE is set: fetching needs the hub; unset it on a machine with internet")
    if missing:
        probe_hub(missing[0])  # hf_hub_download retries a network error for ~30 s; one quick question first
    paths = []
    for file in files:
        try:
            paths.append(Path(hf_hub_download(file.repo_id, file.filename, revision=file.revision,
                                              cache_dir=cache)))
        except Exception as err:  # noqa: BLE001 - no network, proxy, DNS, 404: all mean "not fetched"
            raise not_fetched(file, err) from None
    return paths


def not_fetched(file: HubFile, err: Exception) -> WeightsError:
    return WeightsError(f"cannot fetch {file.repo_id}/{file.filename} from the Hugging Face Hub "
                        f"({type(err).__name__}: the hub cannot be reached or refused); run this on a "
                        "machine with internet (e.g. a login node)")


def probe_hub(file: HubFile) -> None:
    """One HEAD request for a file, without retries and with a short timeout (proxies honoured as for the
    download): offline, it fails in seconds instead of after huggingface_hub's backoff."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(file.repo_id, file.filename, revision=file.revision),
                             timeout=PROBE_TIMEOUT_S, retry_on_errors=False)
    except Exception as err:  # noqa: BLE001 - the same "not fetched" as the download itself
        raise not_fetched(file, err) from None
