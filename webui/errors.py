"""What a failed job's error means, decided in one place: whose fault it is (the request's: a 4xx
and no traceback; an extension's: named, traceback logged; the app's: a 500 and a traceback) and
the one line the user reads. The job queue and anything else that runs work for a client use it."""

from __future__ import annotations

from dataclasses import dataclass

from webui.models.errors import ModelError


class ExtensionError(RuntimeError):
    """A hook raised during a job; the message names the extension and the hook."""


@dataclass(frozen=True)
class Failure:
    message: str  # one line, shown to the user
    bad_input: bool  # the request's fault: HTTP 4xx, no traceback
    log_traceback: bool  # worth a traceback in the log (file and line)


def classify(err: BaseException) -> Failure:
    if isinstance(err, (ModelError, ValueError)):  # JobRejected is a ValueError
        return Failure(str(err), bad_input=True, log_traceback=False)
    if isinstance(err, ExtensionError):
        return Failure(str(err), bad_input=False, log_traceback=True)
    return Failure(f"generation failed: {type(err).__name__}: {err}", bad_input=False, log_traceback=True)
