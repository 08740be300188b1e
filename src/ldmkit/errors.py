"""User-facing errors: the CLI prints them as one line, the server maps them to 4xx."""


class LdmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ModelLoadError(LdmError):
    """A model source is missing, incomplete, corrupted or of an unknown architecture."""


class InvalidRequest(LdmError, ValueError):
    """Generation parameters that cannot be honoured (size, steps, sampler, image...)."""


def describe(error: Exception) -> str:
    """A decoder's or the file system's error as a reason to show a user: no file path, no object address.

    Pillow names what it was given ('cannot identify image file <_io.BytesIO object at 0x...>' or an
    absolute path), and OSError carries the file name; neither belongs in a server's answer.
    """
    from PIL import UnidentifiedImageError  # here: errors is imported where Pillow is not needed

    if isinstance(error, UnidentifiedImageError):
        return "unknown or unsupported image format"
    if isinstance(error, OSError) and (error.filename is not None or error.strerror):
        return error.strerror or type(error).__name__
    return str(error) or type(error).__name__
