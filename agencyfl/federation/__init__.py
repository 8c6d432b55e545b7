"""The contract all parties share: the federation spec, feature encoding, the model and messages.

Submodules are imported where used (nothing here): every Flower message starts a fresh process,
and importing torch or Opacus for a key-exchange message would cost seconds.
"""
