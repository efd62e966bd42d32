"""The code of the served model, logged with it (MLflow models-from-code).

MLflow runs this file when it loads the model, instead of unpickling a Python object: the
model is this code plus the checkpoint artifact (weights loaded with ``weights_only``), so
loading it runs nothing that came from the artifact store but this reviewed file and the
package logged beside it (``code_paths``).
"""

from mlflow.models import set_model

from csmn.tracking.model import CSMNPyfunc

set_model(CSMNPyfunc())
