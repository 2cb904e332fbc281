"""Weights in and out: llmtrain's own checkpoints (`checkpoints`), Hugging Face folders of each architecture family
(`gpt2`, `llama`, both directions), exports and their folders (`export`, `folders`), LoRA adapters through peft
(`lora`), and `pretrained`, which reads any of them for `init_from`. Built on the model and data layers only."""
