"""torch_pp's errors: one root, so a caller can catch ours and the CLI can tell ours from a bug.

Each error also keeps the built-in base it had (``ValueError`` for bad input, ``RuntimeError``
for a failure while running), so ``except ValueError`` in existing code still works. Messages
are for people: what was wrong, on which rank or host, and what to do about it.
"""


class TorchPPError(Exception):
    """The root of every error torch_pp raises on purpose."""


class DefaultModelError(TorchPPError, RuntimeError):
    """The embedded default model cannot be found or converted."""


class DeviceError(TorchPPError, ValueError):
    """A device or dtype this machine cannot use."""


class UnsupportedGenerationError(TorchPPError, ValueError):
    """A generation mode the pipeline cannot run."""


class OptionsError(TorchPPError, ValueError):
    """An option out of range or of the wrong kind; the message names it and what is valid."""


class ModelFolderError(TorchPPError, ValueError):
    """The model folder is missing, incomplete or holds an unsupported model."""


class StageError(TorchPPError, RuntimeError):
    """A stage cannot run the request it was given."""


class TransportError(TorchPPError, RuntimeError):
    """Communication with another rank failed; the message names the peer."""


class WireError(TorchPPError, RuntimeError):
    """A message that does not follow the protocol (wrong peer, version or size)."""


class PlanError(TorchPPError, ValueError):
    """A stage plan that cannot work; the message says why and what to do."""


class PipelineError(TorchPPError, RuntimeError):
    """A stage failed while running a request; the message names the stage."""


class StartupError(TorchPPError, RuntimeError):
    """One or more ranks could not start; the message lists each rank's problem."""
