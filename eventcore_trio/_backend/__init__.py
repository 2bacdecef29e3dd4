"""Kit the two backends share: decoding stored events, the state of a leadership, and the one
implementation of the reader's overloads and of `subscribe`. Nothing above the backends
imports it, except the package root, which exports `EventSubscription` from here.
"""
