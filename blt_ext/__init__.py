"""blt_ext: C++/CUDA kernels and a PyTorch model for the Byte Latent Transformer (BLT).

Importing the package loads the compiled library and registers the ops under
``torch.ops.blt_ext``; ``blt_ext.ops`` holds their typed Python wrappers (with autograd and
torch.compile support) and ``blt_ext.reference`` their pure-PyTorch twins.
"""

import torch


def _load_library():
    try:
        from . import _build_info
    except ImportError as exc:
        raise ImportError(
            "blt_ext is not built: run `pip install --no-build-isolation -e .` (or `make test`) "
            "in the blt_ext checkout first"
        ) from exc
    built = _build_info.TORCH_VERSION
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"blt_ext._C was built against torch {built} but torch {torch.__version__} is "
            "imported; rebuild it with `pip install --no-build-isolation -e .`"
        )
    if _build_info.WITH_CUDA and torch.version.cuda != _build_info.TORCH_CUDA:
        raise ImportError(
            f"blt_ext._C was built against CUDA {_build_info.TORCH_CUDA} but torch "
            f"{torch.__version__} uses CUDA {torch.version.cuda}; rebuild blt_ext"
        )
    from . import _C

    return _C, _build_info


_C, _build_info = _load_library()
WITH_CUDA: bool = _build_info.WITH_CUDA

from . import ops, reference  # noqa: E402  (ops need the library loaded first)

__version__ = "0.1.0"
__all__ = ["ops", "reference", "WITH_CUDA"]
