"""The model layer: the GPT (`gpt`), its layers (`layers`: norms, rotary embeddings, attention, MLPs) and the losses
computed from its outputs (`losses`: token cross-entropy, chunked head + loss, last-token logits). Plain PyTorch:
nothing here imports Lightning, Hydra, OmegaConf, peft or any other part of llmtrain."""
