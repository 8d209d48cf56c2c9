"""User-facing errors: one line that names the file, token or shape and what to do."""


class XTokenError(Exception):
    """An error caused by the user's input; the CLI prints it as one line, without a traceback."""


class TokenizerLoadError(XTokenError):
    """A tokenizer could not be found, read or understood."""


class ProjectionFileError(XTokenError):
    """A projection (W) file is missing, truncated, foreign, or built for other tokenizers."""
