"""The run layer: the recipe (`train`), resolving and checking a composed config (`checks`), the memory pre-flight
(`memory`), outputs in the run dir (`outputs`), TensorBoard (`board`), sweeps and job bookkeeping (`jobs`), ranks
(`distributed`) and decoding for the generate command (`decoding`). Only the command-line entry points import it."""
