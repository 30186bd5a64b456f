"""Inferix: an inference engine for block-diffusion video world models.

    import inferix
    engine = inferix.Engine.from_pretrained("toyworld")
    for frames in engine.generate("a sunny meadow", num_frames=64):   # uint8 [T, H, W, 3] per block
        ...
    inferix.generate("a snowy night", "video.mp4", num_frames=64)

The heavy parts (torch, the engine) load on first use, so light modules such as ``inferix.drift`` import fast.
"""
__version__ = "0.1.0"

_SUBPACKAGE_FOLDERS = ("kernels", "models", "lvbench", "app")


def _map_checkout_folders() -> None:
    """In a source checkout (an editable install), ``inferix.kernels`` and its siblings are the folders beside this
    one. They have no ``__init__.py``, so none of them is an importable top-level package that could shadow an
    installed distribution (``kernels`` is one) when Python runs from the repository root; setuptools' editable
    finder does not map such folders, so this small finder does. An installed wheel holds them inside the package
    folder, and this does nothing there.
    """
    import os
    import sys
    from importlib.machinery import ModuleSpec

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    folders = {f"{__name__}.{n}": os.path.join(root, n) for n in _SUBPACKAGE_FOLDERS
               if not os.path.isdir(os.path.join(here, n)) and os.path.isdir(os.path.join(root, n))}
    if not folders or not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return

    class CheckoutFolders:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in folders:
                return None
            spec = ModuleSpec(name, None, is_package=True)  # a namespace package: no __init__ to run
            spec.submodule_search_locations = [folders[name]]
            return spec

    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "__name__", "") != "CheckoutFolders"]
    sys.meta_path.insert(0, CheckoutFolders)


_map_checkout_folders()

_LAZY = {"Engine": "engine", "Session": "engine", "AdmissionError": "engine", "generate": "api",
         "default_model": "api", "VideoWriter": "sinks", "Mp4Writer": "sinks", "load_model": "api"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'inferix' has no attribute {name!r}")
