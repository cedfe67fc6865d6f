"""The two errors of loading data, which the command line prints as one line (status 2)."""


class DatasetNotFoundError(RuntimeError):
    """A dataset's files are missing or unreadable; the message says where we looked and how to fix it."""


class DataFormatError(ValueError):
    """A data file has the wrong keys, dtypes or shapes; the message names the key and the expectation."""
