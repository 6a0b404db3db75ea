"""Models that frameworks save in their own formats: stored as those files, loaded back
through the framework, without pickle and across the framework's versions.

xgboost (Booster, and its scikit-learn wrappers: the model as UBJSON, the wrapper's
parameters as JSON), lightgbm (the model string; Booster and wrappers), onnx
(``ModelProto``), and Hugging Face objects (transformers models and tokenizers,
sentence-transformers, diffusers pipelines: their ``save_pretrained`` folder, loaded
through ``from_pretrained`` of the recorded class). The handler is picked from the
object's type without importing any framework; loading one imports only it.

Owns: recognising these objects, writing their files into a folder with what the
layout records, and rebuilding them from such a folder. The files become a version of
kind ``framework`` (see ``Vault.save``); trust is decided by the Vault from
``needs_trust``.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

from ._errors import VaultError


class Handler(NamedTuple):
    name: str  # what the layout's "framework" says
    package: str  # what to pip install
    roots: tuple[str, ...]  # top-level modules whose classes it rebuilds


HANDLERS = {h.name: h for h in (
    Handler("xgboost", "xgboost", ("xgboost",)),
    Handler("lightgbm", "lightgbm", ("lightgbm",)),
    Handler("onnx", "onnx", ("onnx",)),
    Handler("huggingface", "transformers", ("transformers", "sentence_transformers",
                                            "diffusers")),
)}
# Files that a save_pretrained folder may hold without needing trust to load: formats
# that carry no code. Anything else (pytorch_model.bin, *.pt, *.pkl, *.py) is loaded
# only as a pickle would be: signed by a trusted key, or with trust=True.
_SAFE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".md", ".onnx", ".ubj")


def find(obj: Any) -> Handler | None:
    """The handler for ``obj``, by its type's module and without importing anything."""
    cls = type(obj)
    root = cls.__module__.split(".", 1)[0]
    if root == "xgboost" and _is_a(cls, "xgboost", ("Booster", "XGBModel")):
        return HANDLERS["xgboost"]
    if root == "lightgbm" and _is_a(cls, "lightgbm", ("Booster", "LGBMModel")):
        return HANDLERS["lightgbm"]
    if root == "onnx" and cls.__name__ == "ModelProto":
        return HANDLERS["onnx"]
    if root in HANDLERS["huggingface"].roots and callable(getattr(obj, "save_pretrained", None)) \
            and (callable(getattr(cls, "from_pretrained", None))
                 or root == "sentence_transformers"):
        return HANDLERS["huggingface"]
    return None


def _is_a(cls: type, root: str, names: tuple[str, ...]) -> bool:
    module = sys.modules[root]
    return any(isinstance(getattr(module, n, None), type) and issubclass(cls, getattr(module, n))
               for n in names)


def save(handler: Handler, obj: Any, folder: Path) -> dict[str, Any]:
    """Write ``obj``'s files into ``folder``; returns what the layout records besides
    them (the class, and parameters). ValueError if this object cannot be stored so
    (the caller then pickles it)."""
    cls = type(obj)
    record: dict[str, Any] = {"framework": handler.name,
                              "class": f"{cls.__module__}.{cls.__qualname__}"}
    if handler.name == "xgboost":
        obj.save_model(folder / "model.ubj")
        if hasattr(obj, "get_params"):
            record["params"] = _json(obj.get_params())
    elif handler.name == "lightgbm":
        if hasattr(obj, "get_params") and not getattr(obj, "fitted_", False):
            raise ValueError("an unfitted lightgbm model has no model string to store")
        booster = obj if not hasattr(obj, "get_params") else obj.booster_
        (folder / "model.txt").write_text(booster.model_to_string())
        if hasattr(obj, "get_params"):
            record["params"] = _json(obj.get_params())
            record["fitted"] = _json({k: v for k, v in vars(obj).items()
                                      if k not in ("_Booster", "_le")
                                      and (k.startswith("_") or k.endswith("_"))})
    elif handler.name == "onnx":
        (folder / "model.onnx").write_bytes(obj.SerializeToString())
    else:
        if cls.__module__.startswith("sentence_transformers"):
            obj.save_pretrained(str(folder), safe_serialization=True)
        else:
            try:
                obj.save_pretrained(folder, safe_serialization=True)
            except TypeError:  # tokenizers and others without the option: no weights
                obj.save_pretrained(folder)
    return record


def needs_trust(names: list[str]) -> list[str]:
    """The files (of a framework version) that could run code when loaded (none: it
    loads without trust)."""
    return [name for name in names if not str(name).lower().endswith(_SAFE_SUFFIXES)]


def load(layout: Any, folder: Path, device: Any = None) -> Any:
    """Rebuild the object a framework version holds from its files in ``folder``."""
    handler = HANDLERS.get(layout.get("framework"))
    if handler is None:
        raise ValueError(f"unknown framework {layout.get('framework')!r}")
    cls = _class(handler, layout.get("class"))
    if handler.name == "xgboost":
        model = cls(**_unjson(layout["params"])) if "params" in layout else cls()
        model.load_model(folder / "model.ubj")
        return model
    if handler.name == "lightgbm":
        lightgbm = sys.modules["lightgbm"]
        booster = lightgbm.Booster(model_str=(folder / "model.txt").read_text())
        if "params" not in layout:
            return booster
        model = cls(**_unjson(layout["params"]))
        for key, value in _unjson(layout.get("fitted", {})).items():
            setattr(model, key, value)
        model._Booster = booster
        if getattr(model, "_classes", None) is not None:
            from sklearn.preprocessing import LabelEncoder

            model._le = LabelEncoder().fit(model._classes)
        return model
    if handler.name == "onnx":
        return sys.modules["onnx"].load(str(folder / "model.onnx"))
    if cls.__module__.startswith("sentence_transformers"):
        return cls(str(folder), device=device)
    model = cls.from_pretrained(str(folder))
    # Moved after loading: from_pretrained's device_map needs the accelerate package.
    return model.to(device) if device is not None and callable(getattr(model, "to", None)) \
        else model


def _class(handler: Handler, path: Any) -> type:
    """The class ``path`` names, imported: only from the handler's own libraries, so an
    edited layout cannot make a load import anything else."""
    if not isinstance(path, str) or path.split(".", 1)[0] not in handler.roots:
        raise ValueError(f"class {path!r} is not one of {handler.name}'s")
    module_name, _, qualname = path.rpartition(".")
    try:
        module: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise VaultError(f"this version holds a model of {handler.name} ({path}): install "
                         f"{handler.package} to load it (pip install {handler.package})"
                         ) from exc
    for name in qualname.split("."):
        module = getattr(module, name)
    if not (isinstance(module, type) and _loadable(handler, module)):
        raise ValueError(f"{path} is not a model class of {handler.name}")
    return module


def _loadable(handler: Handler, cls: type) -> bool:
    """Whether ``cls`` is a model class of the handler's, as ``find`` would pick it."""
    if handler.name in ("xgboost", "lightgbm"):
        bases = ("Booster", "XGBModel") if handler.name == "xgboost" else ("Booster",
                                                                           "LGBMModel")
        return _is_a(cls, handler.name, bases)
    if handler.name == "onnx":
        return cls.__name__ == "ModelProto"
    return cls.__module__.startswith("sentence_transformers") or callable(
        getattr(cls, "from_pretrained", None))


def _json(value: Any) -> Any:
    """Parameters as strict JSON: numpy values as lists with their dtype, non-finite
    floats spelled out. ValueError for anything else (a callable objective, say)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value] if isinstance(value, list) else {
            "tuple": [_json(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return {"items": [[_json(k), _json(v)] for k, v in value.items()]}
        return {"dict": {k: _json(v) for k, v in value.items()}}
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return {"array": value.tolist(), "dtype": value.dtype.str}
    if np is not None and isinstance(value, np.generic):
        return _json(value.item())
    raise ValueError(f"{type(value).__name__} is not a parameter we can store as JSON")


# The largest parameter array rebuilt from a layout: numbers and labels of a model's
# settings (class labels, feature names), never weights.
_MAX_PARAMETER_BYTES = 64 * 1024 * 1024


def _unjson(value: Any) -> Any:
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "float" in value:
        return float(value["float"])
    if "tuple" in value:
        return tuple(_unjson(v) for v in value["tuple"])
    if "dict" in value:
        return {k: _unjson(v) for k, v in value["dict"].items()}
    if "items" in value:
        return {_unjson(k): _unjson(v) for k, v in value["items"]}
    if "array" in value:
        import numpy as np

        # Numbers or labels, and no more bytes than the text can honestly give: the
        # dtype is the file's, and "(16000,16000)f8" or "U100000000" would make each
        # listed element a block of gigabytes.
        dtype = np.dtype(value["dtype"])
        listed = np.array(value["array"], dtype=object)  # a pointer per element
        if (dtype.kind not in "biufcUS" or dtype.subdtype is not None
                or listed.size * dtype.itemsize > _MAX_PARAMETER_BYTES):
            raise ValueError(f"parameter array of dtype {str(value['dtype'])[:40]!r} and "
                             f"{listed.size:,} elements")
        return listed.astype(dtype)
    raise ValueError(f"unknown parameter value {json.dumps(value)[:80]}")
