"""finetune: fine-tune a pretrained checkpoint on your own data in one command."""

__version__ = "0.1.0"
