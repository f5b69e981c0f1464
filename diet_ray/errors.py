"""User-facing errors. The CLI prints these as one line (traceback only with --verbose)."""


class DietRayError(Exception):
    """An error the user can fix: bad input, bad config, incompatible run directory."""


class ConfigError(DietRayError):
    """Unknown key, wrong type or out-of-range value in the configuration."""


class DataError(DietRayError):
    """Missing/empty/corrupt input, an undeclared column, too many rejected rows."""


class RunStateError(DietRayError):
    """A run directory that cannot be resumed: changed config, checksum mismatch."""
