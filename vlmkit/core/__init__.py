"""The contract and the model: what every other package of vlmkit builds on, importing nothing
of them (``tests/test_layout.py``)."""

#: vlmkit's version, written into every manifest (``vlmkit.__version__`` is this one)
__version__ = "0.1.0"
