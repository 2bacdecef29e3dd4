"""Keys: the application's key-encryption key (KEK) and the data keys of subjects.

Each subject has a data key: 32 random bytes, made when its first personal field is sealed.
A store keeps data keys only wrapped by the KEK (`KeyWrapper.wrap`), never in plain; this
process keeps the plain keys it has unwrapped in a bounded cache (`Keyring`), keyed by the
wrapped bytes, so a key another process deleted (a forget) is not found through it.

The KEK is the application's: 32 bytes (AES-256-GCM key wrapping, built in) or any object
with ``wrap`` and ``unwrap`` (a KMS). Without one, personal data cannot be appended; with
the wrong one, a stored key does not unwrap and reading it is a `ConfigurationError`, never
garbage.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Protocol, final, runtime_checkable

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .._errors import ConfigurationError, EventCoreError

#: The environment variable holding the KEK (32 bytes, base64) when none is passed.
KEY_ENCRYPTION_KEY_VARIABLE: Final = "EVENTCORE_KEY_ENCRYPTION_KEY"
#: The size of data keys and of the built-in KEK, in bytes (AES-256).
KEY_BYTES: Final = 32
_NONCE_BYTES: Final = 12
_KEY_ID_BYTES: Final = 8
# The built-in wrapping's format: version, the KEK's id, nonce, sealed key and tag.
_WRAP_VERSION: Final = b"\x01"
_WRAP_CONTEXT: Final = b"eventcore-trio data key v1\x00"
_KEY_ID_CONTEXT: Final = b"eventcore-trio key-encryption key id"
#: The most unwrapped keys a `Keyring` keeps by default (about 10 MB).
DEFAULT_CACHED_KEYS: Final = 100_000
_NO_KEK_ADVICE: Final = (
    "pass key_encryption_key= (32 random bytes, or a KeyWrapper such as a KMS client) when "
    f"opening the store, or set {KEY_ENCRYPTION_KEY_VARIABLE} to 32 random bytes in base64 "
    '(python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"), '
    "and keep it safe: without it no personal field can be read"
)


@runtime_checkable
class KeyWrapper(Protocol):
    """A key-encryption key: wraps subjects' data keys for storage and unwraps them.

    Pass one as ``key_encryption_key=`` to plug in a key management service (its encrypt
    and decrypt calls, with *subject* as the encryption context). Both methods are plain
    functions; the store calls them in a worker thread (`trio.to_thread.run_sync`) when it
    may wait, and this process caches what ``unwrap`` returns, so each key is unwrapped
    about once per process. A call made where the store cannot wait (a key evicted from
    the cache between prefetch and use) runs in the Trio thread: keep them quick.

    An exception from either method propagates as a `ConfigurationError` (the cause
    chained), as does an ``unwrap`` that does not return 32 bytes.

    .. versionadded:: 0.4
    """

    def wrap(self, data_key: bytes, *, subject: str) -> bytes:
        """*data_key* (32 bytes) encrypted for storage, bound to *subject*."""
        ...

    def unwrap(self, wrapped: bytes, *, subject: str) -> bytes:
        """The data key *wrapped* holds (what `wrap` was given for *subject*)."""
        ...


@final
class AesKeyWrapper:
    """The built-in KEK: AES-256-GCM over each data key, with the subject as associated
    data, and the KEK's id in front so that a store opened with another KEK says so."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        # An HMAC of a fixed text under the key: names the key, reveals nothing of it.
        self._id = hmac.new(key, _KEY_ID_CONTEXT, hashlib.sha256).digest()[:_KEY_ID_BYTES]

    @property
    def key_id(self) -> str:
        """A short public name of this KEK (hex), recorded in every key it wraps."""
        return self._id.hex()

    def wrap(self, data_key: bytes, *, subject: str) -> bytes:
        """*data_key* wrapped: version, this KEK's id, nonce, ciphertext and tag."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, data_key, _WRAP_CONTEXT + subject.encode())
        return _WRAP_VERSION + self._id + nonce + sealed

    def unwrap(self, wrapped: bytes, *, subject: str) -> bytes:
        """The data key in *wrapped*.

        Raises:
            ConfigurationError: another KEK wrapped it, or it does not authenticate.
        """
        header = 1 + _KEY_ID_BYTES
        if len(wrapped) < header + _NONCE_BYTES or wrapped[:1] != _WRAP_VERSION:
            raise ConfigurationError(
                f"the stored data key of subject {subject!r} was not wrapped by the built-in "
                "key-encryption key (a KeyWrapper's format?); open the store with the "
                "key_encryption_key that wrapped it"
            )
        found = wrapped[1:header]
        if found != self._id:
            raise ConfigurationError(
                f"the data key of subject {subject!r} was wrapped by the key-encryption key "
                f"with id {found.hex()}, but this store was opened with the one with id "
                f"{self._id.hex()}: open it with the key_encryption_key (or "
                f"{KEY_ENCRYPTION_KEY_VARIABLE}) that wrapped its keys, or rewrap them "
                "under the new one first (store.rewrap)"
            )
        nonce = wrapped[header : header + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, wrapped[header + _NONCE_BYTES :], _WRAP_CONTEXT + subject.encode()
            )
        except InvalidTag:
            raise ConfigurationError(
                f"the stored data key of subject {subject!r} does not unwrap under this "
                "store's key-encryption key (altered, or moved from another subject)"
            ) from None


def resolve_key_encryption_key(
    value: object, environ: Mapping[str, str] | None = None
) -> KeyWrapper | None:
    """The KEK a store is opened with: *value*, else the environment variable, else None.

    Raises:
        ConfigurationError: *value* (or the variable) is not a valid KEK; the message never
            shows the key.
    """
    if value is None:
        text = (os.environ if environ is None else environ).get(KEY_ENCRYPTION_KEY_VARIABLE)
        if text is None or not text.strip():
            return None
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            try:
                raw = base64.urlsafe_b64decode(text.strip())
            except (binascii.Error, ValueError):
                raise ConfigurationError(
                    f"{KEY_ENCRYPTION_KEY_VARIABLE} is not base64; set it to 32 random bytes "
                    "in base64 (44 characters)"
                ) from None
        if len(raw) != KEY_BYTES:
            raise ConfigurationError(
                f"{KEY_ENCRYPTION_KEY_VARIABLE} holds {len(raw)} bytes once decoded; it must "
                f"hold {KEY_BYTES} (44 characters of base64)"
            )
        return AesKeyWrapper(raw)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) != KEY_BYTES:
            raise ConfigurationError(
                f"key_encryption_key must be {KEY_BYTES} bytes (os.urandom({KEY_BYTES})), got "
                f"{len(raw)} bytes"
            )
        return AesKeyWrapper(raw)
    if isinstance(value, str):
        raise ConfigurationError(
            "key_encryption_key must be 32 bytes or a KeyWrapper, got a str; decode a base64 "
            "text first (base64.b64decode(text)), or set it in "
            f"{KEY_ENCRYPTION_KEY_VARIABLE}"
        )
    if callable(getattr(value, "wrap", None)) and callable(getattr(value, "unwrap", None)):
        return value  # type: ignore[return-value]  # it has the protocol's two methods
    raise ConfigurationError(
        "key_encryption_key must be 32 bytes or an object with wrap(data_key, *, subject) "
        f"and unwrap(wrapped, *, subject) (a KeyWrapper), got {type(value).__name__}"
    )


def _call(wrapper: KeyWrapper, method: str, key: bytes, subject: str) -> bytes:
    # One call of a KEK, its failures as ConfigurationError, its result checked.
    try:
        result = getattr(wrapper, method)(key, subject=subject)
    except EventCoreError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"the key-encryption key's {method}() failed for subject {subject!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(result, bytes) or (method == "unwrap" and len(result) != KEY_BYTES):
        got = f"{len(result)} bytes" if isinstance(result, bytes) else type(result).__name__
        advice = (
            f"unwrap must return the {KEY_BYTES}-byte data key: is it the KEK that wrapped it?"
            if method == "unwrap"
            else "wrap must return bytes"
        )
        raise ConfigurationError(
            f"the key-encryption key's {method}() returned {got} for subject {subject!r}; " + advice
        )
    return result


@final
class Keyring:
    """This process's side of the keys of one store: the KEK, and the plain data keys it
    has made or unwrapped, by their wrapped bytes (the store keeps the wrapped ones).

    Args:
        wrapper: the KEK, or None (no personal data can be appended or read).
        max_cached: the most plain keys kept (least recently used go first); None keeps
            every one (the memory store, which keeps everything anyway).
    """

    def __init__(
        self, wrapper: KeyWrapper | None, *, max_cached: int | None = DEFAULT_CACHED_KEYS
    ) -> None:
        self._wrapper = wrapper
        self._max_cached = max_cached
        # Wrapped form -> (plain key, its cipher). Invariant: each entry's key is the
        # wrapped form of its plain key, under this keyring's KEK or an earlier one of it
        # (rewrap keeps what it rewrapped).
        self._cache: OrderedDict[bytes, tuple[bytes, AESGCM]] = OrderedDict()

    @property
    def configured(self) -> bool:
        """Whether there is a KEK."""
        return self._wrapper is not None

    def _require(self) -> KeyWrapper:
        if self._wrapper is None:
            raise ConfigurationError(
                "personal fields need a key-encryption key, and this store has none: "
                + _NO_KEK_ADVICE
            )
        return self._wrapper

    async def _run(self, wrapper: KeyWrapper, method: str, key: bytes, subject: str) -> bytes:
        if isinstance(wrapper, AesKeyWrapper):
            # Microseconds and no I/O: no worker thread.
            await trio.lowlevel.checkpoint()
            return _call(wrapper, method, key, subject)
        return await trio.to_thread.run_sync(
            functools.partial(_call, wrapper, method, key, subject)
        )

    def _keep(self, wrapped: bytes, key: bytes) -> AESGCM:
        aead = AESGCM(key)
        self._cache[wrapped] = (key, aead)
        if self._max_cached is not None:
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return aead

    async def new_key(self, subject: str) -> tuple[bytes, AESGCM]:
        """A new data key for *subject*: its wrapped form (what the store keeps) and the
        plain key, ready to seal with.

        Raises:
            ConfigurationError: there is no KEK (the message says what to set), or it
                failed.
        """
        wrapper = self._require()
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        wrapped = await self._run(wrapper, "wrap", key, subject)
        return wrapped, self._keep(wrapped, key)

    def open(self, subject: str, wrapped: bytes) -> AESGCM:
        """The plain key of *subject* stored as *wrapped*: from the cache, else unwrapped
        here (in the Trio thread: prefetch with `prefetch` where the caller can wait).

        Raises:
            ConfigurationError: no KEK, or it cannot unwrap *wrapped* (the wrong KEK).
        """
        found = self._cache.get(wrapped)
        if found is not None:
            self._cache.move_to_end(wrapped)
            return found[1]
        return self._keep(wrapped, _call(self._require(), "unwrap", wrapped, subject))

    async def prefetch(self, keys: Iterable[tuple[str, bytes]]) -> None:
        """Unwrap the (subject, wrapped) *keys* not cached yet, in a worker thread for a
        `KeyWrapper` (the store's read paths call this before decoding a page).

        Raises:
            ConfigurationError: as `open`.
        """
        for subject, wrapped in keys:
            if wrapped not in self._cache:
                self._keep(wrapped, await self._run(self._require(), "unwrap", wrapped, subject))

    def discard(self, wrapped: bytes) -> None:
        """Drop one plain key (its subject was forgotten)."""
        self._cache.pop(wrapped, None)

    def clear(self) -> None:
        """Drop every plain key, as a new process would start."""
        self._cache.clear()

    async def rewrap(
        self, keys: Sequence[tuple[str, bytes]], wrapper: KeyWrapper
    ) -> dict[str, bytes]:
        """Each of the (subject, wrapped) *keys* unwrapped with this keyring's KEK and
        wrapped with *wrapper*, by subject; the new forms are cached. The caller stores
        them and then calls `use`.

        Raises:
            ConfigurationError: a key does not unwrap, or *wrapper* fails.
        """
        result: dict[str, bytes] = {}
        for subject, wrapped in keys:
            found = self._cache.get(wrapped)
            if found is None:
                key = await self._run(self._require(), "unwrap", wrapped, subject)
            else:
                key = found[0]
            new = await self._run(wrapper, "wrap", key, subject)
            self._keep(new, key)
            result[subject] = new
        return result

    def use(self, wrapper: KeyWrapper) -> None:
        """Wrap new keys with *wrapper* from now on (after a `rewrap`)."""
        self._wrapper = wrapper
