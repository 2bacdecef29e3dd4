"""The customers that the personal-data contract (`_personal`) writes and decides on:
events with personal fields (one with an older shape and its upcaster), a snapshotted state,
a command that copies personal data from the state into a new event and one that does not,
and a stand-in key management service."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..._events import NewEvent
from ..._typed import EventRegistry

ADA_EMAIL = "ada.lovelace@example.org"
ADA_NAME = "Ada Lovelace"
BOB_EMAIL = "bob.babbage@example.org"
BOB_NAME = "Bob Babbage"


def registered(customer: str, email: str = ADA_EMAIL, name: str = ADA_NAME) -> NewEvent:
    """A ``CustomerRegistered`` event of *customer*, with two personal fields."""
    return NewEvent(
        "CustomerRegistered",
        {"customer": customer, "email": email, "name": name, "plan": "basic"},
        subject=customer,
        personal=["email", "name"],
    )


# -- the typed domain: events, an upcaster, a state, two commands ----------------------------

registry = EventRegistry()


@registry.register("CustomerRegistered", version=2, subject="customer", personal=["email", "name"])
@attrs.frozen
class CustomerRegistered:
    """Version 2: ``name`` (version 1 stored ``full_name``)."""

    customer: str
    plan: str
    email: str | None = None
    name: str | None = None


@registry.upcaster("CustomerRegistered", version=1)
def _full_name_to_name(data: dict[str, Any]) -> dict[str, Any]:
    # After a forget the personal fields are absent: an upcaster of personal data uses get.
    data["name"] = data.pop("full_name", None)
    return data


@registry.register("PlanChanged", subject="customer", personal=["email"])
@attrs.frozen
class PlanChanged:
    """A plan change, confirmed to the customer's email (copied from the folded state)."""

    customer: str
    plan: str
    email: str | None = None


@registry.register("Touched", subject="customer")
@attrs.frozen
class Touched:
    """An event about a customer with no personal field."""

    customer: str


@registry.state("Customer", snapshot_every=1)
@attrs.frozen
class Customer:
    """A customer's stream folded: what commands decide on (snapshotted at every event)."""

    email: str | None = None
    name: str | None = None
    plan: str | None = None
    events: int = 0

    def evolve(self, event: object) -> Customer:
        """Fold one typed event."""
        if isinstance(event, CustomerRegistered):
            return Customer(event.email, event.name, event.plan, self.events + 1)
        if isinstance(event, PlanChanged):
            return attrs.evolve(self, plan=event.plan, events=self.events + 1)
        return attrs.evolve(self, events=self.events + 1)


@attrs.frozen
class ChangePlan:
    """Change a customer's plan, confirming to the email in its state (personal)."""

    customer: str
    plan: str

    def streams(self) -> Mapping[str, type[Any]]:
        """The customer's stream."""
        return {self.customer: Customer}

    def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[object]]:
        """One `PlanChanged` carrying the state's email."""
        state: Customer = states[self.customer]
        return {self.customer: [PlanChanged(self.customer, self.plan, state.email)]}


@attrs.frozen
class Touch:
    """Append a `Touched` (no personal field) to a customer's stream."""

    customer: str

    def streams(self) -> Mapping[str, type[Any]]:
        """The customer's stream."""
        return {self.customer: Customer}

    def decide(self, states: Mapping[str, Any]) -> Mapping[str, Sequence[object]]:
        """One `Touched`."""
        return {self.customer: [Touched(self.customer)]}


class Kms:
    """A stand-in key management service: a `KeyWrapper` of its own key, counting calls."""

    def __init__(self, *, fail: bool = False) -> None:
        self._aead = AESGCM(os.urandom(32))
        self.fail = fail
        self.calls: list[str] = []

    def wrap(self, data_key: bytes, *, subject: str) -> bytes:
        """Encrypt under the service's key, the subject as context."""
        self.calls.append(f"wrap {subject}")
        if self.fail:
            raise OSError("the key service is unreachable")
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data_key, subject.encode())

    def unwrap(self, wrapped: bytes, *, subject: str) -> bytes:
        """Decrypt."""
        self.calls.append(f"unwrap {subject}")
        return self._aead.decrypt(wrapped[:12], wrapped[12:], subject.encode())
