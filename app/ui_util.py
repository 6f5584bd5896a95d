"""Small UI helpers: errors as plain messages, never a traceback."""
from __future__ import annotations

import functools
import logging

import gradio as gr

log = logging.getLogger(__name__)


def friendly(fn):
    """Turn a user-fixable exception into a Gradio error toast with its plain message."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError, KeyError) as e:  # ConfigError and friends are ValueErrors
            raise gr.Error(str(e) or type(e).__name__, print_exception=False) from None
        except Exception as e:  # a bug: log it, show one line
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(e).__name__}: {e}). The app keeps running.", print_exception=False) from None
    return wrapper
