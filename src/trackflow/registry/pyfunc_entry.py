"""The file MLflow loads the packaged model from ("models from code").

Logged with the model by :func:`trackflow.registry.packaging.log_packaged_model`; MLflow runs it
at load time, and it names the :class:`~trackflow.registry.packaging.PackagedModel` to use, so the
model's class is imported from the installed trackflow rather than unpickled. Its fitted parts
(preprocessor, detector: joblib files; network: weights only) are its artifacts.
"""

from mlflow.models import set_model

from trackflow.registry.packaging import PackagedModel

set_model(PackagedModel())
