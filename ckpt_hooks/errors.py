"""The one error type the tools report to users: a single line naming the file and the cause."""


class CheckpointError(Exception):
    """A problem with a checkpoint or a request, reported as one line ``<path>: <cause>``."""

    def __init__(self, path, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")
