"""What a trainer's or a checkpoint's weights are, and where vLLM keeps them.

- :mod:`.spec`: a checkpoint's tensors (names, shapes, dtypes), the checks of weights offered against it,
  :class:`WeightMismatchError`, the tied-head rule;
- :mod:`.stream`: the trainer's side, :class:`WeightStream` (DDP, FSDP2, ZeRO-3, PEFT, MoE layouts);
- :mod:`.layout`: vLLM's layout (fused slices, stacked experts, tensor-parallel cuts, the tied head);
- :mod:`.verify`: the bitwise proof, :func:`verify`;
- :mod:`.checkpoints`: random-weight checkpoints of several model families (no downloads).

Imports nothing else of the package: every other part may import this one.
"""
