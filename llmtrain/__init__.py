"""llmtrain: GPT-style language models trained from Hydra configs with PyTorch Lightning."""

__version__ = "0.1.0"

from llmtrain import lean_imports

lean_imports.install()
