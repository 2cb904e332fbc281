"""The stages: one object per way of training (pretraining, classification, instruction tuning, DPO), named by
`_target_` in conf/finetune/<stage>.yaml. A stage owns what differs between them: which weights train, batch ->
loss and metrics, how evaluation sums reduce to metrics, sample prompts, the final summary, its files in the run
dir and what it adds to the memory estimate. The training loop and the recipe only call it."""
