"""Weights in and out: llmtrain's own checkpoints (`checkpoints`), Hugging Face folders of each architecture family
(`gpt2`, `llama`, each both ways) with what their folders share (`folders`) and the dispatch between them (`hf`),
LoRA adapters through peft (`lora`) and under transformers' names (`adapters`), and `pretrained`, which reads any
of them for `init_from`. Built on the model and data layers only."""
