"""Everything MLflow, and the only package that imports it: runs (store, params, metrics,
runs that end FAILED on errors), the pyfunc model, the Model Registry, and evaluation and
ablation runs."""

from csmn.tracking.evaluation import (
    EvaluationRecord,
    EvaluationRun,
    ModelSource,
    data_digest,
    evaluation_metrics,
    evaluation_run,
    find_evaluation,
    is_mlflow_uri,
    log_ablation,
    log_evaluation,
    model_source,
    pinned_model_uri,
    resolve_checkpoint,
)
from csmn.tracking.model import CSMNPyfunc, log_pyfunc_model, model_signature
from csmn.tracking.registry import registered_model_name, tag_model_version
from csmn.tracking.runs import (
    finished_or_failed,
    flatten_params,
    get_or_create_experiment,
    local_artifact_location,
    log_metrics,
    log_params,
    metric_histories,
    resolve_tracking_uri,
    start_or_resume_run,
)

__all__ = [
    "CSMNPyfunc", "EvaluationRecord", "EvaluationRun", "ModelSource", "data_digest",
    "evaluation_metrics", "evaluation_run", "find_evaluation", "finished_or_failed",
    "flatten_params", "get_or_create_experiment", "is_mlflow_uri", "local_artifact_location",
    "log_ablation", "log_evaluation", "log_metrics", "log_params", "log_pyfunc_model",
    "metric_histories", "model_signature", "model_source", "pinned_model_uri",
    "registered_model_name",
    "resolve_checkpoint", "resolve_tracking_uri", "start_or_resume_run", "tag_model_version",
]
