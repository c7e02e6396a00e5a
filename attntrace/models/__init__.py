"""Models: real checkpoints (config.json, safetensors, tokenizer.json) turned into specs of
transformer blocks, and captures recorded from PyTorch modules."""
