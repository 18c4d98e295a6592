"""minipt.kernels: the fused prompt-concat op (Triton kernels, autograd, reference, dispatcher).

This folder is installed as `minipt.kernels` (pyproject's package-dir). It is never the top-level package
`kernels`: that name belongs to Hugging Face's `kernels`, which transformers imports.
"""

if __name__ == "kernels":
    # Python found this folder as a top-level `kernels` because the repository root is first on sys.path
    # (`python -m pytest`, `python -m minipt` or a script run from the root). A folder with an `__init__.py` wins
    # over every later path entry, so this file steps aside: it loads the next `kernels` on the path (Hugging Face's)
    # in its place, or, when there is none, an empty namespace package. Nothing of minipt runs under this name, so
    # the minipt:: custom ops are registered once, by `minipt.kernels.prompt_concat`.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _other_paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = None
    for _finder in sys.meta_path:  # the path finder, asked about every entry but the root, and any other finder
        _find = getattr(_finder, "find_spec", None)
        if _find is not None:
            _is_path_finder = _finder is importlib.machinery.PathFinder
            _spec = _find("kernels", _other_paths if _is_path_finder else None)
        if _spec is not None:
            break
    if _spec is None:
        # No other `kernels` is installed. Give what Python gives for a folder without an `__init__.py` that holds
        # nothing: an empty namespace package (no __file__, no __version__, nothing to import from it). Libraries that
        # probe for the package by importing it (transformers' is_kernels_available) read that as "not installed";
        # a ModuleNotFoundError raised here would instead break their import (seen with transformers 5.17).
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    del sys.modules["kernels"]
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds once this file has run
    try:
        if _spec.loader is not None:  # None only for a namespace package, which has no code to run
            _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise
else:
    from .prompt_concat import prompt_concat, prompt_concat_reference

    __all__ = ["prompt_concat", "prompt_concat_reference"]
