"""The data layer: where documents and records come from (`sources`, `choice`), tokenizers (`tokenizer`,
`tokenizer_json`), prompt templates (`prompts`), the pretraining token stream (`tokens`), the record tables of the
fine-tuning stages (`tables`, `preferences`) and loaders that resume mid-epoch and evaluate each sample once
(`loaders`). It imports the model layer's loss constants at most; never training, stages or the run layer."""
