"""python -m llmtrain [overrides...]: train as the Hydra config in conf/ says."""

from llmtrain.cli import main

if __name__ == "__main__":
    main()
