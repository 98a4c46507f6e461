"""Training (paper §4 set-up): ``s2ft train`` and ``s2ft plan``.

* :mod:`.trainer`: the :class:`~.trainer.Trainer` (``setup / train / save_checkpoint /
  cleanup``);
* :mod:`.methods`: what trains (S²FT, or a benchmark's baseline), and its selection;
* :mod:`.checkpoints`: checkpoint files, the resume checks and the resumed state;
* :mod:`.metrics`: the set-up summary, metrics.jsonl, the console and TensorBoard;
* :mod:`.signals`: Ctrl-C and SIGTERM stop after a step, with a checkpoint;
* :mod:`.distributed`, :mod:`.sharding`: processes under torchrun, DDP and FSDP2;
* :mod:`.quantization`, :mod:`.nf4`: nf4 and int8 frozen bases (bitsandbytes);
* :mod:`.memory`: the memory plan of a run (``s2ft plan``).
"""
