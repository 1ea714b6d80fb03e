"""Training: LightningModule, DataModules, metrics, callbacks and the CLI (needs Lightning)."""
