"""finetune: fine-tune a pretrained checkpoint on your own data in one command."""

import logging

__version__ = "0.1.0"

# bitsandbytes (which peft imports) tries to fetch a 4-bit CPU kernel from the Hub as it is imported, and warns on
# every run where it cannot; finetune uses its 8-bit optimizer only
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
