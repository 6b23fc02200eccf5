"""User-facing error types: each names the problem in one line; the CLI prints it and exits non-zero."""


class LayerSkipError(Exception):
    """Base class for errors caused by user input (bad checkpoints, arguments, prompts)."""


class CheckpointError(LayerSkipError):
    """A checkpoint is missing, corrupt, truncated, or of an unsupported architecture or tensor type."""


class GenerationError(LayerSkipError):
    """Invalid generation arguments (lengths, sampling parameters, prompt longer than the context)."""


class TrainingError(LayerSkipError):
    """Invalid training input: unknown scale or curriculum names, out-of-range rates, empty or too small
    datasets, a resume whose configuration differs from the checkpoint's, a checkpoint of another model."""
