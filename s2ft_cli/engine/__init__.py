"""The S²FT engine (paper §3): what turns a model into one that trains a few heads and
channels per layer.

* :mod:`.targets`: the seven projections, their coupled structures and axes (one table);
* :mod:`.models`, :mod:`.gguf_bases`: architectures, shapes, loading (GGUF files too);
* :mod:`.config`: ``S2FTConfig``, what to train;
* :mod:`.scores`, :mod:`.selection`, :mod:`.plots`: which units train (§3.2);
* :mod:`.permute`: the co-permutation that makes them one dense block (§3.1);
* :mod:`.layers`, :mod:`.ffn`, :mod:`.losses`: partial back-propagation (§3.3), the FFN's
  recomputed activation, the memory-lean loss;
* :mod:`.state`, :mod:`.convert`: what s2ft has done to a model, and the conversion.
"""
