"""Old import path of :mod:`trackflow.registry.packaging`, kept for logged models.

Models logged before the library was split into wings carry a ``pyfunc_entry.py`` that imports
``trackflow.packaging``; they still load.
"""

from trackflow.registry.packaging import *  # noqa: F403
