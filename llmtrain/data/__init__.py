"""Data for every stage: `sources` (where rows and documents come from), `tokens` (the pretraining token stream),
`tables` (the labelled tables of the classify and instruct stages)."""
