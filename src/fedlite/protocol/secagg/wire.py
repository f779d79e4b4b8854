"""The secure-aggregation stages as messages (`protocol.messages`): base64 fields to and from the stage objects."""

from __future__ import annotations

import base64
import binascii

from fedlite.protocol.messages import AdvertEntry, RevealedShare
from fedlite.protocol.secagg.participant import Advert, StageError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise StageError(f"{what} is not base64") from None


def advert_entry(advert: Advert) -> AdvertEntry:
    return AdvertEntry(advert.client, b64(advert.encryption_key), b64(advert.mask_key), b64(advert.seed_commitment))


def advert_of(entry: AdvertEntry) -> Advert:
    return Advert(entry.client, unb64(entry.encryption_key, "encryption_key"), unb64(entry.mask_key, "mask_key"),
                  unb64(entry.seed_commitment, "seed_commitment"))


def revealed_entries(revealed: dict[str, tuple[int, str, bytes]]) -> dict[str, RevealedShare]:
    return {owner: RevealedShare(point, kind, b64(share)) for owner, (point, kind, share) in revealed.items()}


def revealed_of(entries: dict[str, RevealedShare]) -> dict[str, tuple[int, str, bytes]]:
    return {owner: (e.point, e.kind, unb64(e.share, "share")) for owner, e in entries.items()}
