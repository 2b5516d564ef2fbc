"""The errors a user can meet, each a single line: what went wrong, why, and what to do."""


class UserError(ValueError):
    """Bad input, weights or settings; the CLI prints it as one line and exits 2."""

    def __init__(self, what: str, why: str = "", todo: str = ""):
        self.what, self.why, self.todo = what, why, todo
        super().__init__("; ".join(part for part in (what, why, todo) if part))


class WeightsError(UserError):
    """Weights missing, corrupt, tampered with, or built for another architecture."""


class DeviceError(UserError):
    """A requested compute device that does not exist here."""


class Cancelled(Exception):
    """The user cancelled a run; nothing was written."""
