"""Stage one: backbones (T2T-ViT registered with timm, timm ViTs and CNNs), datasets, Mul-Add costs, extraction.

Importing this package registers the T2T-ViT family with timm's registry.
"""
from . import _torchvision  # noqa: F401  (must precede timm: see _torchvision.py)
from . import t2t_vit  # noqa: F401,E402  (registers t2t_vit_* with timm)
