"""MLflow artifact writes: where ``mlflow.log_text``/``log_dict``/``log_table``/``log_image``/
``log_artifact``/``log_artifacts`` and their ``MlflowClient`` methods meet (see
``_artifacts``). The consolidated artifacts are written when the run ends, from the
``end_run`` patch in ``mlflow_runs``."""

from __future__ import annotations

from .._artifacts import guard_log_artifacts, install_signal_handlers, uninstall_signal_handlers
from .._patching import PatchSpec

NAME = "mlflow_artifacts"
TARGET_MODULE = "mlflow"

PATCHES = (
    PatchSpec("mlflow.tracking.client", "MlflowClient.log_artifact", wrapper=guard_log_artifacts),
    PatchSpec("mlflow.tracking.client", "MlflowClient.log_artifacts", wrapper=guard_log_artifacts),
)


def on_install() -> None:
    install_signal_handlers()  # a container stop writes what is spooled before the process ends


def on_uninstall() -> None:
    uninstall_signal_handlers()
