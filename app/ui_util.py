"""Small UI helpers: errors as plain messages, never a traceback."""
from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

log = logging.getLogger(__name__)


def plain_error(fn, e: Exception) -> gr.Error:
    if isinstance(e, (ValueError, OSError, KeyError)):  # ConfigError and friends are ValueErrors
        return gr.Error(str(e) or type(e).__name__, print_exception=False)
    log.exception("handler %s failed", fn.__name__)  # a bug: log it, show one line
    return gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The app keeps running.", print_exception=False)


def friendly(fn):
    """Turn a user-fixable exception into a Gradio error toast with its plain message (generators too)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as e:
                raise plain_error(fn, e) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise plain_error(fn, e) from None
    return wrapper
