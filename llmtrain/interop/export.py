"""Until the entry points import from their new homes (the next commit): hf.py, gpt2.py, adapters.py."""

from llmtrain.interop.adapters import export_hf_adapter, is_hf_adapter  # noqa: F401
from llmtrain.interop.gpt2 import gpt2_mismatches  # noqa: F401
from llmtrain.interop.hf import export_hf  # noqa: F401
