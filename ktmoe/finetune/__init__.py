"""`ktmoe finetune`: LoRA SFT of a transformers v5 MoE model whose routed experts run in ktmoe.

    ktmoe finetune                                  # built-in tiny Qwen3-MoE + shipped data set
    ktmoe finetune --model DIR --data FILE --out DIR

Modules (torch and transformers are imported only when a job runs):
- cli.py: the command line (flags, defaults, error reporting).
- (reading the checkpoint is the library's: ktmoe.torch.checkpoint, whose CheckpointError
  train.py and merge.py report as this command's input errors)
- readers.py: --data (JSON lines, JSON array, Parquet, Arrow, save_to_disk directory) -> rows.
- data.py: example layouts (chat, ShareGPT, prompt-completion, Alpaca, text) -> token ids,
  labels, token-budget batches.
- tiny.py: the built-in tiny model and tokenizer (fixed seed, built locally, no download).
- train.py: the training loop, checkpoints / --resume, logs, loss plot and summary.
- output.py: atomic writes into --out.
- merge.py: `ktmoe merge`: an adapter merged into its checkpoint (dequantized), a plain bf16 one.
- ranks.py: data-parallel ranks (torchrun or --nproc): who reads, writes and computes what.
- launch.py: `--nproc N` starts N local ranks (torch.distributed's elastic launcher);
  __main__.py: `python -m ktmoe.finetune ARGS`, what each rank (or torchrun) runs.
"""


class FinetuneError(Exception):
    """A problem with the user's input (model, data, flags, --out): printed without a traceback."""
