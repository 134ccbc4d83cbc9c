"""User-facing error types: each message says what is wrong and, where it can, what to do."""


class SgarcError(Exception):
    """Base class of sgarc's user-facing errors."""


class ImageError(SgarcError, ValueError):
    """An input image cannot be coded as asked; the message says why and what to do."""


class BitstreamError(SgarcError, ValueError):
    """A stream is not a valid sgarc bitstream; the message says what is wrong."""


class ModelError(SgarcError, ValueError):
    """A model id is unknown or its weights fail their integrity check."""
