"""Training: build a recipe's model and data (`build`, `pretrained`, `data`), run its stages (`stages`), train on
Accelerate (`trainer`), checkpoint and resume (`checkpoint`). The entry points are `retrofit.training.trainer.train`
and `.dry_run`."""
