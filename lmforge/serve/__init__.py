"""Serving: a continuous-batching engine and an OpenAI-compatible HTTP API over it."""

from lmforge.serve.engine import Engine, Event, QueueFull, SequenceHandle

__all__ = ["Engine", "Event", "QueueFull", "SequenceHandle", "create_app"]


def __getattr__(name: str):
    # the web app pulls in FastAPI; import it only when asked for
    if name == "create_app":
        from lmforge.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
