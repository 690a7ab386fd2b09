"""One exception tree for the whole SDK: catch ``FleetuneError`` to catch them all."""


class FleetuneError(Exception):
    """Root of every error fleetune raises on purpose."""


class ConfigError(FleetuneError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FleetuneError, ValueError):
    """A corpus cannot be read or has too little text to use."""


class BackendError(FleetuneError):
    """An inference engine failed (wraps native return codes and library exceptions)."""


class BackendUnavailable(BackendError, ImportError):
    """An optional engine is not installed; the message names the ``pip install`` that fixes it."""


class TransportError(FleetuneError):
    """The broker cannot be reached or did not accept a message."""


class PayloadError(FleetuneError, ValueError):
    """An update or adapter is malformed, oversized, tampered with, or for another model.
    ``reason`` is a short code for counting refusals (the server's metrics); the message says
    the rest."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class AggregationError(FleetuneError):
    """A round cannot be aggregated (no usable update, inconsistent shapes)."""
