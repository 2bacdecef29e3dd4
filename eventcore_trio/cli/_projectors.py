"""``MODULE:ATTR``: finding the projectors that ``run`` hosts and ``dead-letters replay`` and
``dashboard --projectors`` use."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .._errors import ConfigurationError, EventCoreError


def load_projectors(target: str) -> list[Any]:
    """Import ``MODULE:ATTR`` and return the projectors it names.

    ATTR may be a projector, a list or tuple of them, or a function returning either.

    Raises:
        ConfigurationError: the target cannot be imported (not found, a syntax error, an
            error raised while importing it), its function raises, or it names something
            that is not a projector. The message says which, without a traceback: the code
            is the user's, and the cause is in the message.
    """
    from ..projection import check_projector

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"expected MODULE:ATTR, got {target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    except SyntaxError as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r}: {exc.msg} ({exc.filename}, line {exc.lineno})"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(
            f"cannot import {module_name!r}: importing it raised "
            f"{_described(exc)}{_where(exc, module_name)}"
        ) from exc
    finally:
        sys.path.pop(0)
    try:
        value = getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from exc
    if callable(value) and not hasattr(value, "name"):
        try:
            value = value()
        except Exception as exc:
            raise ConfigurationError(
                f"calling {target} raised {_described(exc)}{_where(exc, module_name)}"
            ) from exc
    projectors = list(value) if isinstance(value, list | tuple) else [value]
    if not projectors:
        raise ConfigurationError(f"{target} names no projectors")
    for candidate in projectors:
        try:
            check_projector(candidate)
        except EventCoreError as exc:
            raise ConfigurationError(
                f"{target} must name a projector, a list or tuple of them, or a function "
                f"returning either; {exc}"
            ) from exc
    return projectors


def _described(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _where(exc: BaseException, module_name: str) -> str:
    # The innermost frame of the user's module: where to look, without a traceback.
    tb = exc.__traceback__
    found = ""
    root = module_name.split(".")[0]
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if name == root or name.startswith(root + "."):
            found = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return found
