"""Models a federation can train, and the contract the round loop relies on."""

from tapdist.models.base import ClientInfo, FederatedModel

__all__ = ["ClientInfo", "FederatedModel"]
