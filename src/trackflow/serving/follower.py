"""Following the alias: a thread that reads ``NAME@ALIAS`` and swaps in each new version."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from trackflow.data.inputs import InputError
from trackflow.serving.model import RefusedVersion, ServedModel, load_version, utc_now
from trackflow.tracking import is_transient

if TYPE_CHECKING:
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)


class ModelFollower:
    """Serves the version ``models:/NAME@ALIAS`` names, and the next one when the alias moves.

    ``current`` is the served model (None until one is ready). :meth:`start` runs :meth:`check`
    on a thread now and every ``poll_interval_s``; loading happens there, off the request path.
    A version that fails through its own fault is refused until restart; one that fails on a
    passing fault (:func:`is_transient_failure`) is tried again at the next poll.
    """

    def __init__(self, tracking: Tracking, name: str, alias: str, poll_interval_s: float) -> None:
        self.tracking = tracking
        self.name = name
        self.alias = alias
        self.poll_interval_s = poll_interval_s
        self.current: ServedModel | None = None
        self.refused: dict[str, dict[str, str]] = {}
        self.status = "starting: the alias has not been read yet"
        self.last_checked: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Read the alias once; load, test and swap in the version it names if that is new."""
        try:
            version = str(
                self.tracking.client.get_model_version_by_alias(self.name, self.alias).version
            )
        except Exception as exc:  # the store is down, the model or the alias does not exist
            self._report(f"cannot read models:/{self.name}@{self.alias}: {_message(exc)}")
            return
        finally:
            self.last_checked = utc_now()
        if version in self.refused:
            self._report(self._refusal(version))
            return
        if self.current and self.current.version == version:
            self._report(f"serving version {version}", logging.INFO)
            return
        self.status = f"loading version {version}"
        log.info("models:/%s@%s -> version %s: loading it", self.name, self.alias, version)
        try:
            served = load_version(self.tracking, self.name, version)
        except Exception as exc:
            if is_transient_failure(exc):  # not the version's fault: try it again next poll
                self._report(self._retrying(version, exc), logging.WARNING)
                log.debug("why version %s could not be loaded", version, exc_info=True)
                return
            self.refused[version] = {"version": version, "error": _message(exc), "at": utc_now()}
            self._report(self._refusal(version))
            log.debug("why version %s was refused", version, exc_info=True)
            return
        previous, self.current = self.current, served
        self.status = f"serving version {version}"
        log.info(
            "now serving version %s%s", version, f" (was {previous.version})" if previous else ""
        )

    def start(self) -> None:
        """Check now, then every ``poll_interval_s`` seconds, on a daemon thread."""
        self._thread = threading.Thread(target=self._follow, name="model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a load in progress finishes on its own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval_s + 1)

    def describe(self) -> dict[str, Any]:
        """What ``GET /models/NAME`` shows of the served version and the follower's state."""
        served = self.current
        return {
            "name": self.name,
            "alias": self.alias,
            "version": served.version if served else None,
            "run_id": served.run_id if served else None,
            "source": served.source if served else None,
            "loaded_at": served.loaded_at if served else None,
            "classes": list(served.scorer.classes) if served else None,
            "lineage": served.lineage if served else None,
            "status": self.status,
            "refused": list(self.refused.values()),
            "poll": {"interval_s": self.poll_interval_s, "last_checked": self.last_checked},
        }

    def _follow(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a bug here must not stop the following
                log.exception("checking models:/%s@%s failed", self.name, self.alias)
            if self._stop.wait(self.poll_interval_s):
                return

    def _refusal(self, version: str) -> str:
        return f"refused version {version}: {self.refused[version]['error']}; {self._keeping()}"

    def _retrying(self, version: str, exc: Exception) -> str:
        return (
            f"cannot load version {version} now, retrying at the next poll: {_message(exc)}; "
            f"{self._keeping()}"
        )

    def _keeping(self) -> str:
        return f"serving {f'version {self.current.version}' if self.current else 'nothing'}"

    def _report(self, status: str, level: int = logging.ERROR) -> None:
        if status != self.status:  # once per change, not once per poll
            log.log(level, "%s", status)
        self.status = status


def is_transient_failure(exc: Exception) -> bool:
    """Whether loading a version failed on a passing fault rather than through its own fault.

    Transient: :func:`~trackflow.tracking.is_transient` (a sign of a busy or unreachable store),
    except that a :class:`RefusedVersion` or an :class:`~trackflow.data.inputs.InputError` (its
    smoke test) never is, whatever its text; anything else (it does not unpickle or import, its
    prediction fails) is the version's own fault.
    """
    return not isinstance(exc, RefusedVersion | InputError) and is_transient(exc)


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or "no message"
    return f"{type(exc).__name__}: {text}"
