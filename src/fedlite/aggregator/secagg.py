"""The server's side of secure aggregation: rebuild the survivors' self-mask seeds and the drop-outs' mask keys from
revealed shares, check them against what the devices advertised, and unmask the sum (`protocol.secagg`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedlite.protocol.secagg import keys, masking, shamir
from fedlite.protocol.secagg.participant import Advert, commitment


class UnmaskError(ValueError):
    """Too few shares for a device, or shares that rebuild something it did not advertise (tampered)."""


def unmask_sum(masked_sum: np.ndarray, bits: int, context: bytes, threshold: int, adverts: Mapping[str, Advert],
               graph: Mapping[str, list[str]], survivors: set[str], dropped: set[str],
               revealed: Mapping[str, Mapping[str, tuple[int, str, bytes]]]) -> np.ndarray:
    """The survivors' signed integer sum. `revealed[r][owner]` is the share of `owner`'s secret that revealer r
    sent: its point, "self" (owner survived) or "mask" (owner dropped), the share."""
    self_seeds = [_rebuild_seed(u, context, threshold, adverts[u], revealed) for u in sorted(survivors)]
    pairs = []
    for v in sorted(dropped):
        mask_key = _rebuild_mask_key(v, threshold, adverts[v], revealed)
        pairs += [(u, v, mask_key.agree(adverts[u].mask_key, "mask", context))
                  for u in graph[v] if u in survivors]
    return masking.unmask(masked_sum, bits, self_seeds, pairs)


def _shares(owner: str, kind: str, revealed: Mapping[str, Mapping[str, tuple[int, str, bytes]]]) -> dict[int, bytes]:
    return {x: share for shares in revealed.values() if owner in shares
            for x, k, share in [shares[owner]] if k == kind}


def _rebuild_seed(owner: str, context: bytes, threshold: int, advert: Advert,
                  revealed: Mapping[str, Mapping[str, tuple[int, str, bytes]]]) -> bytes:
    shares = _shares(owner, "self", revealed)
    try:
        seed = shamir.combine(shares, threshold)
    except shamir.ShareError as exc:
        raise UnmaskError(f"self-mask seed of {owner}: {exc}") from None
    if commitment(context, seed) != advert.seed_commitment:
        raise UnmaskError(f"the shares of {owner}'s self-mask seed rebuild another seed (tampered)")
    return seed


def _rebuild_mask_key(owner: str, threshold: int, advert: Advert,
                      revealed: Mapping[str, Mapping[str, tuple[int, str, bytes]]]) -> keys.KeyPair:
    shares = _shares(owner, "mask", revealed)
    try:
        pair = keys.KeyPair.from_secret(shamir.combine(shares, threshold))
    except shamir.ShareError as exc:
        raise UnmaskError(f"mask key of {owner}: {exc}") from None
    if pair.public != advert.mask_key:
        raise UnmaskError(f"the shares of {owner}'s mask key rebuild another key (tampered)")
    return pair
