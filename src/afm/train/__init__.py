"""Training: one loop for pre-training, mid-training, context extension and fine-tuning."""
