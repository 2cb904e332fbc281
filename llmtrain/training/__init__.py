"""The training layer: the LightningModule that runs any stage (`module`), optimizers and the schedule (`optim`),
callbacks (`callbacks`, `logs`), the NaN guard (`nonfinite`), random states for exact resume (`resume`), FSDP
helpers (`sharded`), FLOP counts (`flops`) and what the hardware supports (`hardware`). It knows no stage by name."""
