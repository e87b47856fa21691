"""Old import path of :mod:`trackflow.learn.anomaly`, kept for pickles.

Detectors pickled before the library was split into wings (``models/detector.joblib``, the
artifacts of registered models) name this module; they still load.
"""

from trackflow.learn.anomaly import *  # noqa: F403
