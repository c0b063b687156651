"""MLflow model serving: each scoring request is one unit of work.

A model served by MLflow's scoring server (``mlflow models serve``: a pyfunc, a ChatModel, a
ResponsesAgent) answers independent requests in one process. Without this, every request
would share the process scope: three identical requests would look like one agent repeating
itself (a loop), and the server's 51st call would trip the call ceiling for good. The
server's ``invocations`` (called once per ``/invocations`` request, in a worker thread) is
wrapped to run inside a fresh ``runguard.session``, with ``autolog()``'s limits.
"""

from __future__ import annotations

import itertools
from typing import Any

from .._patching import PatchSpec
from .._runtime import RUNTIME
from .._scopes import session

NAME = "mlflow_serving"
TARGET_MODULE = "mlflow"

_requests = itertools.count(1)


def _per_request(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    if not RUNTIME.enabled:
        return wrapped(*args, **kwargs)
    with session(f"scoring-request-{next(_requests)}"):
        return wrapped(*args, **kwargs)


PATCHES = (PatchSpec("mlflow.pyfunc.scoring_server", "invocations", wrapper=_per_request, lazy=True),)
