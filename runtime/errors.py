"""Errors headsteer raises on bad input: each names the problem and what was expected."""


class HeadsteerError(Exception):
    """Base class of every error headsteer raises deliberately."""


class InputError(HeadsteerError, ValueError):
    """Bad input to a model, engine or command (shape, dtype, steering, class name...)."""


class BundleError(HeadsteerError):
    """A bundle is missing, corrupt, truncated, from a newer format, or mismatched."""


class UnsupportedModelError(HeadsteerError):
    """A timm model or module headsteer cannot wrap."""


class DataError(HeadsteerError):
    """A data set spec, folder or file is missing or malformed."""
