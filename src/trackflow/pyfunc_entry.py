"""The file MLflow loads the packaged model from ("models from code": nothing is pickled).

Logged with the model by :func:`trackflow.packaging.log_packaged_model`; MLflow runs it at load
time, and it names the :class:`~trackflow.packaging.PackagedModel` to use.
"""

from mlflow.models import set_model

from trackflow.packaging import PackagedModel

set_model(PackagedModel())
