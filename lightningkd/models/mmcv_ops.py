"""A stand-in for mmcv's compiled ops, so mmsegmentation imports on mmcv-lite.

mmcv-lite ships no compiled ops, and a few mmseg files import ``mmcv.ops`` at module level, so a bare
``import mmseg.models`` fails with ``No module named 'mmcv._ext'``. :func:`install_mmcv_ops_stand_in`
registers a stand-in ``mmcv._ext`` whose functions raise :class:`MMCVOpsMissingError` when called:
models without compiled ops then build and train, and models that need them fail with a message naming
the fix. A real, importable ``mmcv._ext`` is left alone.

Example:
    >>> stand_in = _MissingOpsModule()
    >>> try:
    ...     stand_in.psamask_forward()
    ... except MMCVOpsMissingError as err:
    ...     print(str(err).split(",")[0])
    mmcv op 'psamask_forward' was called
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_EXT_NAME = "mmcv._ext"
_OPS_HELP = (
    "compiled mmcv ops are not installed: this model needs mmcv built with ops; models without compiled ops "
    "(PSPNet, DeepLabV3/V3+, FCN, SegFormer, BiSeNet, STDC ...) work on mmcv-lite. To run this model, "
    "replace mmcv-lite by a full mmcv build matching your torch and CUDA (`pip uninstall mmcv-lite` then "
    "`mim install 'mmcv>=2.0,<2.2'`, or build mmcv from source), or pick a config without compiled ops."
)


class MMCVOpsMissingError(RuntimeError):
    """A compiled mmcv op was called but only mmcv-lite (no ``mmcv._ext``) is installed."""


class _MissingOpsModule(types.ModuleType):
    """Stand-in for ``mmcv._ext``: every op is a function raising :class:`MMCVOpsMissingError`.

    mmcv's ``ext_loader.load_ext`` imports ``mmcv._ext`` and asserts ``hasattr`` for each op name at
    import time; answering every (non-dunder) name lets ``import mmcv.ops`` succeed, and the error is
    raised only when an op is actually called.
    """

    def __init__(self, reason: str = "") -> None:
        super().__init__(
            _EXT_NAME, "Stand-in for mmcv's compiled ops, installed by lightningkd.models.mmcv_ops."
        )
        # a spec without a loader: importlib.util.find_spec / pkgutil.find_loader (used by mmengine's
        # mmcv_full_available) then report "no compiled ops" instead of raising on a missing __spec__
        self.__spec__ = importlib.machinery.ModuleSpec(_EXT_NAME, None)
        self._stand_in_reason = reason

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        reason = self._stand_in_reason

        def missing_op(*args: Any, **kwargs: Any) -> Any:
            detail = f" (importing the real mmcv._ext failed: {reason})" if reason else ""
            raise MMCVOpsMissingError(f"mmcv op {name!r} was called, but {_OPS_HELP}{detail}")

        missing_op.__name__ = missing_op.__qualname__ = name
        return missing_op


def install_mmcv_ops_stand_in() -> bool:
    """Register the ``mmcv._ext`` stand-in in ``sys.modules`` when mmcv's compiled ops are absent.

    Must run before the first ``import mmseg.models`` (or ``import mmcv.ops``); :class:`MMSegSegmenter`
    calls it itself. Does nothing when ``mmcv._ext`` is already imported or imports for real.

    Returns:
        ``True`` when the stand-in is (now or already) in place, ``False`` when real compiled ops are used.

    Raises:
        ImportError: mmcv itself is not installed.
    """
    existing = sys.modules.get(_EXT_NAME)
    if existing is not None:
        return isinstance(existing, _MissingOpsModule)
    try:
        importlib.import_module("mmcv")
    except ImportError as err:
        raise ImportError(
            f"mmsegmentation models need mmcv ({err}). Install the segmentation extra: "
            "`pip install 'lightningkd[seg]'` (mmengine, mmcv-lite<2.2, mmsegmentation)."
        ) from err
    reason = ""
    if importlib.util.find_spec(_EXT_NAME) is not None:
        try:
            importlib.import_module(_EXT_NAME)
            return False  # real compiled ops
        except ImportError as err:  # e.g. built for another torch (undefined symbol)
            reason = str(err)
    sys.modules[_EXT_NAME] = _MissingOpsModule(reason)
    mmcv = sys.modules["mmcv"]
    if not hasattr(mmcv, "_ext"):
        mmcv._ext = sys.modules[_EXT_NAME]  # what a real submodule import would set
    return True
