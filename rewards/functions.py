"""Loading the user's reward functions named in the configuration (`module:function` or
`path/to/file.py:function`), with the checks that make a mistake fail before Ray starts.
How they are called, and how their failures mask samples: rewards/channels.py. Pure: no Ray,
vLLM or HTTP."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

RewardFn = Callable[..., Any]


_FILE_MODULES: dict[tuple[str, int], Any] = {}


def _import_file(spec: str, path: Path) -> Any:
    """Import a .py file once per version of it (several channels may name one file, and its
    module-level state, e.g. an HTTP client, should exist once)."""
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _FILE_MODULES:
        module_spec = importlib.util.spec_from_file_location(f"rlsys_reward_{abs(hash(key[0]))}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: report, don't crash with a traceback
            raise ValueError(f"{spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def load_reward_function(spec: str) -> RewardFn:
    """`package.module:function` or `path/to/file.py:function` -> the function.
    Raises ValueError saying what is wrong (format, missing file/module, missing function)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec!r}: file {target} does not exist")
        module = _import_file(spec, path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ValueError(f"{spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {target} has no function {name!r}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec!r}: cannot read the signature of {name}: {e}") from e
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        raise ValueError(f"{spec!r}: {name} must take the sample's text as its first argument")
    return fn


def check_kwargs(spec: str, fn: RewardFn, kwargs: dict[str, Any]) -> None:
    """Raise ValueError naming any configured keyword argument the function does not take."""
    from rewards.channels import signature_fields

    required, optional, var_kw = signature_fields(fn)
    unknown = sorted(set(kwargs) - required - optional)
    if unknown and not var_kw:
        raise ValueError(f"{spec!r}: kwargs {unknown} are not parameters of {fn.__name__} "
                         f"(it takes {sorted(required | optional) or 'only the text'})")
