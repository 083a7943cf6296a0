"""The one place that imports torchvision (timm imports it too, so this runs before timm).

Why: the torchvision 0.28 wheel that pip pairs with the CPU-only torch 2.13 wheel is a CUDA build whose
compiled ops do not load against that torch, and its `torchvision._meta_registrations` then raises
`operator torchvision::nms does not exist` at import. We use none of those ops (no nms, no roi_align), only
datasets and transforms, so when (and only when) the plain import fails with exactly that error we import it
again with that one module stubbed out. Where torchvision imports normally (a matching CUDA or CPU pair) this
does nothing.
"""
import sys
import types

import torch  # noqa: F401  (torchvision must see torch first)


def import_torchvision():
    """Import torchvision, working around a CPU torch / CUDA torchvision pair; returns the module."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision
    return torchvision


torchvision = import_torchvision()
