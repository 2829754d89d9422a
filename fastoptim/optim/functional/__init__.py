"""Functional optimizer cores, one module per family: each holds the pure-torch core (the readable statement of the
math, and the ``fused=False`` path), the native core (calls into ``torch.ops.fastoptim``) and the entry that picks
one with a visible condition (``fastoptim.ops.use_native``). Entries update parameters and state in place.

    common         global-norm clip, step counters, the decoupled update that ends every step
    adam           AdamW, NAdamW, Cautious, Mars          adam_mini   Adam-mini
    lion           Lion                                   momentum    signum; the momentum of Muon's pure path
    newton_schulz  Muon's and Scion's matrix step         sophia      Sophia-H and its Hessian EMA
    soap, kron     the block preconditioners (blocks: how parameters are cut into same-shape blocks)

Conventions shared by every core: see common.
"""
