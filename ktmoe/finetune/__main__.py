"""`python -m ktmoe.finetune ARGS` (e.g. under torchrun): the same job as `ktmoe finetune ARGS`."""
import sys

from ..cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
