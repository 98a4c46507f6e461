"""Adapters (paper §5): the trained update as rows and columns of the original matrices.

* :mod:`.fingerprint`: what an adapter records of its base, and the comparison of bases;
* :mod:`.peft`: the same update as a PEFT LoRA adapter (PEFT, vLLM), and back;
* :mod:`.format`: the :class:`~.format.Adapter`, its files (both versions) and
  ``save_pretrained``;
* :mod:`.runtime`: ``get_s2ft_model``, load, fuse, switch, merge, unload;
* :mod:`.combine`: several adapters summed into one;
* :mod:`.serving`: several adapters served at once, one per sequence.
"""
