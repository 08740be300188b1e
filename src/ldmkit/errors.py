"""User-facing errors: the CLI prints them as one line, the server maps them to 4xx."""


class LdmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelLoadError(LdmError):
    """A model source is missing, incomplete, corrupted or of an unknown architecture."""


class InvalidRequest(LdmError, ValueError):
    """Generation parameters that cannot be honoured (size, steps, sampler, image...)."""
