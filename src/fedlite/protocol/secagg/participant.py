"""A device's side of one secure-aggregation round: its keys, the shares it deals and holds, its masked input and
what it reveals for unmasking. Pure state, no transport (the agent carries the messages).

Stages (SecAgg+, Bell et al., CCS 2020, Fig. 2): 1. advertise two X25519 public keys; 2. deal Shamir shares of
the self-mask seed b and of the mask key's secret to each neighbour, each encrypted for it; 3. send the masked
input; 4. for each neighbour, reveal the share of b if it survived stage 3, or of its mask key if it dropped out:
never both for one device, so the server can never remove both masks of anyone.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import numpy as np

from fedlite.protocol.secagg import keys, masking, shamir


class StageError(ValueError):
    """A message that does not fit the round: unknown sender, wrong stage, a share that does not open."""


@dataclass(frozen=True)
class Advert:
    client: str
    encryption_key: bytes  # X25519 public key of c (the shares' encryption)
    mask_key: bytes  # X25519 public key of s (pairwise masks)
    seed_commitment: bytes  # SHA-256(context | b): lets the server check the self-mask seed it rebuilds


def commitment(context: bytes, seed: bytes) -> bytes:
    return hashlib.sha256(context + b"/self-seed/" + seed).digest()


@dataclass
class Participant:
    me: str
    context: bytes  # binds every derived key and ciphertext to the round (federation, round, session)
    threshold: int
    point: int  # my Shamir point: the x of every share I hold (public: my place in the round's ring, plus 1)
    _c: keys.KeyPair = field(default_factory=keys.KeyPair.generate)
    _s: keys.KeyPair = field(default_factory=keys.KeyPair.generate)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    neighbours: dict[str, Advert] = field(default_factory=dict)
    held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (its b share, its s share)
    points: dict[str, int] = field(default_factory=dict)  # neighbour -> its Shamir point

    def advert(self) -> Advert:
        return Advert(self.me, self._c.public, self._s.public, commitment(self.context, self._b))

    def meet(self, neighbours: list[Advert], points: dict[str, int], threshold: int | None = None) -> None:
        """Stage 2 opens: my neighbours' adverts (as the server relays them), their Shamir points and mine, and the
        round's threshold (when the server fixes it only now)."""
        if threshold is not None:
            self.threshold = threshold
        if self.me in points:
            self.point = points[self.me]
        if self.threshold < 2:
            raise StageError(f"a threshold of {self.threshold} protects nothing")
        if any(c not in points for c in [a.client for a in neighbours]):
            raise StageError("a neighbour without a Shamir point")
        self.neighbours = {a.client: a for a in neighbours if a.client != self.me}
        if len(self.neighbours) < self.threshold:
            raise StageError(f"{len(self.neighbours)} neighbours, fewer than the threshold {self.threshold}")
        self.points = {c: points[c] for c in self.neighbours}

    def deal(self) -> dict[str, bytes]:
        """Stage 2: {neighbour: its encrypted shares of my b and s}, dealt at the neighbours' points."""
        xs = list(self.points.values())
        b_shares = shamir.split(self._b, self.threshold, xs)
        s_shares = shamir.split(self._s.secret, self.threshold, xs)
        return {c: keys.seal(self._share_key(a), b_shares[self.points[c]] + s_shares[self.points[c]],
                             self._associated(self.me, c))
                for c, a in self.neighbours.items()}

    def hold(self, sender: str, sealed: bytes) -> None:
        """Stage 2, receiving: a neighbour's shares for me (refused unless it is a neighbour and they open)."""
        advert = self.neighbours.get(sender)
        if advert is None:
            raise StageError(f"{sender} is not a neighbour of {self.me}")
        plain = keys.open_sealed(self._share_key(advert), sealed, self._associated(sender, self.me))
        if len(plain) != 2 * shamir.SHARE_BYTES:
            raise StageError(f"shares from {sender} have {len(plain)} bytes")
        self.held[sender] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])

    def masked(self, values: np.ndarray, bits: int, alive: set[str]) -> np.ndarray:
        """Stage 3: my masked input, with a pairwise mask for each neighbour still in (`alive`: those whose shares
        I hold; the others dropped before stage 2 finished and are out of this round altogether)."""
        pairs = {c: self._s.agree(a.mask_key, "mask", self.context) for c, a in self.neighbours.items() if c in alive}
        return masking.masked_input(values, bits, self._b, pairs, self.me)

    def reveal(self, survivors: set[str], dropped: set[str]) -> dict[str, tuple[int, str, bytes]]:
        """Stage 4: {neighbour: (my point, "self" | "mask", the share)} for the neighbours the server names;
        a device named in both is refused (revealing both would unmask its input)."""
        if survivors & dropped:
            raise StageError(f"asked for both shares of {sorted(survivors & dropped)}")
        out = {}
        for client, (b_share, s_share) in self.held.items():
            if client in survivors:
                out[client] = (self.point, "self", b_share)
            elif client in dropped:
                out[client] = (self.point, "mask", s_share)
        return out

    def _share_key(self, peer: Advert) -> bytes:
        return self._c.agree(peer.encryption_key, "shares", self.context)

    def _associated(self, sender: str, recipient: str) -> bytes:
        return self.context + b"/" + sender.encode() + b"->" + recipient.encode()


def round_context(federation: str, run: str, number: int, session: str) -> bytes:
    """What binds a secure round's keys, shares and masks to it: a replay into another round opens nothing."""
    return f"fedlite-secagg/{federation}/{run}/{number}/{session}".encode()
