"""The user-error types: bad input of any kind ends in one ``error:`` line and exit code 2.

Every exception a user can cause by what they pass (options, paths, files, models, data) derives
from :class:`UserError`; the CLI catches that one base class. This module imports nothing heavy so
that the CLI can refuse bad input before torch or transformers are loaded.
"""

from __future__ import annotations

# The exit code of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports a process Ctrl-C
# stopped): ``fp16rl train`` exits with it, and ``compare`` reads it as "interrupted", not "failed".
INTERRUPTED_EXIT = 130


class UserError(ValueError):
    """Input that cannot work; the message names the problem (file, row, field, option)."""


class ConfigError(UserError):
    """An option value or combination that cannot work."""


class FolderInUseError(ConfigError):
    """An output folder that already holds something: fp16rl never writes into it (nothing is lost)."""


class ModelError(UserError):
    """A model path or model option that cannot work."""


class PrecisionError(UserError):
    """The engines' precisions disagree with what was declared, or a dtype name is unknown."""


class DatasetError(UserError):
    """A dataset that cannot be used as given; the message names the file, task and problem."""


class ReportError(UserError):
    """Run folders that cannot be reported on."""


class ProbeError(UserError):
    """Probe settings or inputs that cannot work."""
