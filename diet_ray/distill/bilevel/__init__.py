"""The bi-level distillation step (DESIGN §6) in plain torch: no Ray, runs wherever its tensors are.

Outer variables: the addressed slots' logits, numeric values, label logits and weight
parameters (and optionally the inner learning rate). Inner loop: a student built from the
expert's architecture starts at a random expert checkpoint θ_c and takes differentiable steps
(``torch.func.functional_call``) on weighted memory minibatches; backprop is truncated to the
last ``unroll`` steps. The outer loss compares where the student ends with where the expert went.

Modules, by concern:
- ``tensors``, ``collectives``: parameter dicts, float copies of saved tensors, the rank reduction;
- ``inner_optim``: the student's differentiable optimiser steps (Adam, row-sparse Adam);
- ``student``: the student network over the embedding rows it can touch;
- ``minibatch``: the seeded global minibatches of memory slots and their weighted loss;
- ``unroll``: the inner loop from an expert checkpoint, and its no-data end point;
- ``objectives``: the outer losses (``distill.objective``), one class each;
- ``distiller``: ``ShardDistiller``, one rank's outer variables and the outer loop.
"""
