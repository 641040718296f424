"""hf-finetune: transfer-learning recipes for image classification on the Hugging Face stack.

Heavy libraries (torch, transformers, datasets) are imported inside the functions that need them, so that
`import hf_finetune` and `hf-finetune --help` stay fast.
"""

__version__ = "0.1.0"
