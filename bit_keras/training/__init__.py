"""Training: the run engine (`engine`, `run_folder`, `trainer`, `strategy`, `logs`) and its recipes, fine-tuning
with the BiT-HyperRule (`finetune`, `hyperrule`) and upstream pretraining (`pretrain`, `upstream`)."""
