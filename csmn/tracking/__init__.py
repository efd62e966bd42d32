"""Everything MLflow, and the only package that imports it: runs (store, params, metrics,
runs that end FAILED on errors), the pyfunc model, and the Model Registry."""

from csmn.tracking.model import CSMNPyfunc, log_pyfunc_model, model_signature
from csmn.tracking.registry import registered_model_name, tag_model_version
from csmn.tracking.runs import (
    finished_or_failed,
    flatten_params,
    log_metrics,
    log_params,
    resolve_tracking_uri,
    start_or_resume_run,
)

__all__ = [
    "CSMNPyfunc", "finished_or_failed", "flatten_params", "log_metrics", "log_params",
    "log_pyfunc_model", "model_signature", "registered_model_name", "resolve_tracking_uri",
    "start_or_resume_run", "tag_model_version",
]
