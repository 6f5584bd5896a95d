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


def keep_edits(components, remember, inputs) -> None:
    """Call remember(inputs) after every change of these components' values, the last one always.

    `.change`, not `.input`: Gradio's Textbox fires `input` for typed characters only, not for Backspace or Delete,
    a paste or an input method, so emptying a field or pasting into it would not be kept. `change` also fires when
    a handler sets the value, which is kept too (restoring the form on load writes back what was read)."""
    gr.on([c.change for c in components], remember, inputs, show_progress="hidden", trigger_mode="always_last")
