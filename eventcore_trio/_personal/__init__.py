"""Personal data that can be forgotten (crypto-shredding): the declarations, the sealed form,
the keys and the forget, shared by every backend.

Each module answers one question: `_fields` (what an event declares), `_envelope` (how a
value or a snapshot is sealed and opened), `_keys` (the key-encryption key and the data keys
of subjects), `_forget` (the audit record, the ``SubjectForgotten`` event, the process caches
told of a forget). The modules import nothing of this package's ``__init__``, so the core
(`_events`) can use `_fields` without a cycle.
"""
