"""peftjax's error family: every failure a user can fix is a ``PeftError``.

The ``peftjax`` command catches ``PeftError`` and prints it as one line,
``peftjax: error: ...``, with exit code 2; any other exception is a bug and
keeps its traceback. Each subclass says where the problem lies, and its
message names the config key, file or module at fault and the fix:

* ``ConfigError``: an experiment config or override (the dotted key);
* ``DataError``: a data file or its contents (the file, the column);
* ``ModelLoadError``: a model name, checkpoint folder or weight file;
* ``AdapterError``: an adapter folder (``save_adapter``/``load_adapter``);
* ``RunError``: a run that cannot start or go on (output folder, lock,
  checkpoints, devices, the other hosts), ``CheckpointError`` among them;
* ``BenchError``: a benchmark request.

``PeftWarning`` is what peftjax warns with (the command prints it as
``peftjax: warning: ...``). ``Preempted`` is not an error: it ends a run that a signal asked to stop
after it wrote a checkpoint, and carries what the command prints.
"""

from __future__ import annotations

import signal as signal_lib


class PeftError(ValueError):
    """A PEFT configuration or operation that cannot be carried out.

    Raised before anything is changed: a model that saw a ``PeftError`` is
    exactly as it was before the call.
    """


class ConfigError(PeftError):
    """An experiment config that cannot be used, with the dotted key at fault.

    ``key`` is the full dotted key when the problem belongs to one field
    (``"train.batch_size"``), else ``None``; ``detail`` is the explanation
    without the key. Nested sections re-raise their children's errors with
    their own prefix, so the message always names the key as written in YAML.
    """

    def __init__(self, detail: str, key: str | None = None) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (``"data."``, ``"methods.0."``) before its key."""
        return ConfigError(self.detail, f"{prefix}{self.key}" if self.key else prefix.rstrip(".") or None)


class DataError(PeftError):
    """Data that cannot be loaded or does not fit the model; the message says how to fix it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder the config names does not exist."""


class ModelLoadError(PeftError):
    """A model name, checkpoint or model configuration that cannot become a peftjax model."""


class CheckpointNotFoundError(ModelLoadError, FileNotFoundError):
    """The checkpoint folder, ``config.json`` or a weight file is missing."""


class UnsupportedModelError(ModelLoadError):
    """A ``model_type``, preset name or task that peftjax has no implementation for."""


class AdapterError(PeftError):
    """An adapter folder that cannot be written or read, or does not fit the model."""


class RunError(PeftError):
    """A run that cannot start or cannot go on; the message names the fix."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RunError):
    """A training checkpoint that cannot be written or restored; earlier ones are kept."""


class OutputLockedError(RunError):
    """Another live process is training into the same ``output_dir``."""


class BenchError(PeftError):
    """A benchmark request that cannot be measured (model, methods, sizes)."""


class PeftWarning(UserWarning):
    """Something the user should know that does not stop the command (a checkpoint skipped)."""


class Preempted(Exception):
    """A run stopped by a signal after checkpointing; ``--resume`` continues it.

    ``exit_code`` is the shell's for death by that signal (128 + its number:
    143 for SIGTERM, 130 for SIGINT), so schedulers see a preempted job.
    """

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal_lib.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}; "
                         "run the same command with --resume to continue")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
