"""Kit the two backends share, and only they: decoding stored events, the state of a
leadership, and the one implementation of the reader's overloads. Nothing above the backends
imports it.
"""
