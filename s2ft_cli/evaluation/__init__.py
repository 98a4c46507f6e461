"""Evaluation on the paper's commonsense and arithmetic reasoning sets (paper §4).

``tasks`` holds the sets and their answer rules, ``request`` resolves what ``s2ft eval``
asks for (no torch), ``decoding`` asks the model (generation or answer likelihoods),
``report`` scores outputs and writes results, ``runner`` puts them together over models,
adapters and processes.
"""
