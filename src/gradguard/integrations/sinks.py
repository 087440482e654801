"""Optional sinks for experiment trackers: Weights & Biases and MLflow.

Neither package is a dependency: each sink imports its tracker when it is built and says
which package to install when it is missing. Both implement :class:`gradguard.record.Sink`
and receive the same records as the JSONL log (scalars per step, events as they happen)::

    guard = gg.Guard(model, optimizer, sinks=[WandbSink(project="exp")])
    guard = gg.Guard(model, optimizer, sinks=[MLflowSink()])   # the active MLflow run
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["MLflowSink", "WandbSink"]

# Step-record columns sent as metrics; flags become 0/1.
_SCALARS = ("loss", "grad_norm", "clipped_norm", "clip_coef", "lr_scale", "lr")
_FLAGS = ("skipped", "nonfinite", "grad_spike", "loss_spike")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a step record (NaN/Inf arrive as strings and are left out)."""
    out: dict[str, float] = {}
    for k in _SCALARS:
        v = record.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    for k in _FLAGS:
        if k in record:
            out[k] = float(bool(record[k]))
    return out


def _missing(sink: str, package: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"{sink} needs the '{package}' package, which is not installed: pip install {package}"
    )


class WandbSink:
    """Log steps and events to a Weights & Biases run, on the x-axis ``<prefix>step``.

    The sink declares its own step metric (``run.define_metric``), so it never moves
    wandb's step counter backwards for the rest of your logging; log your own metrics
    without an explicit ``step=``, as wandb advises with custom axes.

    Args:
        run: the run to log to; default ``wandb.run``, or a new run from ``init_kwargs``.
        prefix: prefix of every metric name.
        **init_kwargs: passed to ``wandb.init`` when the sink starts the run itself (it
            then also finishes it on :meth:`close`).
    """

    def __init__(self, run: Any = None, prefix: str = "gradguard/", **init_kwargs: Any) -> None:
        try:
            import wandb
        except ImportError as e:
            raise _missing("WandbSink", "wandb") from e
        self._wandb = wandb
        self._owns_run = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self._owns_run = True
        self.run = run
        self.prefix = prefix
        self._step_key = f"{prefix}step"
        run.define_metric(self._step_key)
        run.define_metric(f"{prefix}*", step_metric=self._step_key)
        self._events: list[list[Any]] = []

    def meta(self, record: dict[str, Any]) -> None:
        self.run.config.update({f"{self.prefix}config": record.get("config", {}),
                                f"{self.prefix}params": len(record.get("params", []))},
                               allow_val_change=True)

    def steps(self, records: list[dict[str, Any]]) -> None:
        p = self.prefix
        for r in records:
            self.run.log({self._step_key: r["step"],
                          **{p + k: v for k, v in _scalars(r).items()}})

    def event(self, record: dict[str, Any]) -> None:
        self._events.append([record["step"], record["kind"], record.get("action"),
                             record.get("message", "")])
        self.run.log({self._step_key: record["step"],
                      f"{self.prefix}events/{record['kind']}": 1.0})

    def close(self) -> None:
        if self._events:
            table = self._wandb.Table(columns=["step", "kind", "action", "message"],
                                      data=self._events)
            self.run.log({f"{self.prefix}events": table})
            self._events = []
        if self._owns_run:
            self.run.finish()
            self._owns_run = False


class MLflowSink:
    """Log steps as MLflow metrics (batched), events as metrics plus a JSON artifact.

    Args:
        run_id: the run to log to; default the active run, or a new one from
            ``start_kwargs`` (then ended on :meth:`close`).
        prefix: prefix of every metric name (MLflow allows ``/`` in names).
        **start_kwargs: passed to ``mlflow.start_run`` when the sink starts the run itself.
    """

    _BATCH = 1000  # MLflow's log_batch accepts at most 1000 metrics per call

    def __init__(self, run_id: str | None = None, prefix: str = "gradguard/",
                 **start_kwargs: Any) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("MLflowSink", "mlflow") from e
        self._mlflow = mlflow
        self._metric = Metric
        self._owns_run = False
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                active = mlflow.start_run(**start_kwargs)
                self._owns_run = True
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = MlflowClient()
        self.prefix = prefix
        self._events: list[dict[str, Any]] = []

    def meta(self, record: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, record, f"{self.prefix}meta.json")

    def steps(self, records: list[dict[str, Any]]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(key=self.prefix + k, value=v, timestamp=now, step=r["step"])
                   for r in records for k, v in _scalars(r).items()]
        for i in range(0, len(metrics), self._BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self._BATCH])

    def event(self, record: dict[str, Any]) -> None:
        self._events.append(record)
        self.client.log_metric(self.run_id, f"{self.prefix}events/{record['kind']}", 1.0,
                               step=record["step"])

    def close(self) -> None:
        if self._events:
            self.client.log_dict(self.run_id, {"events": self._events},
                                 f"{self.prefix}events.json")
        if self._owns_run:
            active = self._mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                self._mlflow.end_run()
            else:
                self.client.set_terminated(self.run_id)
            self._owns_run = False
