"""Signed broadcasts: a pinned key verifies; unsigned, forged, replayed-elsewhere and unknown-key ones fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedlite.agent.config import load_config
from fedlite.protocol.signing import SignatureError, Signer, Verifier, generate_keypair
from fedlite.settings import ConfigError

ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493  # L, the base point's order (RFC 8032)


@pytest.fixture()
def keys(tmp_path):
    return generate_keypair(tmp_path / "old"), generate_keypair(tmp_path / "new")


def test_a_signed_payload_verifies_and_comes_back_unchanged(keys):
    (private, public), _ = keys
    envelope = Signer.from_file(private).sign("fl/f/round", b'{"round": 1}')
    assert Verifier.from_files([str(public)]).verify("fl/f/round", envelope) == b'{"round": 1}'


@pytest.mark.parametrize("case, reason", [("unsigned", "unsigned"), ("tampered", "forged"),
                                          ("other_topic", "forged"), ("other_key", "unknown_key")])
def test_bad_envelopes_are_refused_with_a_reason(keys, case, reason):
    (private, public), (other_private, _) = keys
    signer = Signer.from_file(other_private if case == "other_key" else private)
    envelope = signer.sign("fl/f/weights/3", b"payload bytes")
    topic = "fl/f/weights/4" if case == "other_topic" else "fl/f/weights/3"
    if case == "unsigned":
        envelope = b"payload bytes"
    if case == "tampered":
        envelope = envelope[:-1] + b"X"
    with pytest.raises(SignatureError) as err:
        Verifier.from_files([str(public)]).verify(topic, envelope)
    assert err.value.reason == reason


def test_rotation_trusts_both_keys_until_the_old_one_is_removed(keys):
    (old_private, old_public), (new_private, new_public) = keys
    both = Verifier.from_files([str(old_public), str(new_public)])
    for private in (old_private, new_private):
        assert both.verify("t", Signer.from_file(private).sign("t", b"x")) == b"x"
    with pytest.raises(SignatureError, match="untrusted key"):
        Verifier.from_files([str(new_public)]).verify("t", Signer.from_file(old_private).sign("t", b"x"))


def test_generate_refuses_to_overwrite_and_keeps_the_private_key_private(tmp_path):
    private, _ = generate_keypair(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)
    out = subprocess.run([sys.executable, "-m", "fedlite.cli", "keys", "generate", str(tmp_path / "cli")],
                         capture_output=True, text=True, check=True).stdout
    assert "key id:" in out and (tmp_path / "cli" / "aggregator.pub").exists()


def test_an_agent_without_a_pinned_key_does_not_start(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[device]\nclient_id = "a"\nfederation = "f"\n[data]\nsource = "npz"\npath = "x.npz"\n')
    with pytest.raises(ConfigError, match="pin the aggregator's public key"):
        load_config(path)


RFC8032_TEST_1 = ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                  "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
                  "6bd25bf5f0595bbe24655141438e7a100b")


def test_the_device_verifier_accepts_rfc8032_and_openssl_signatures_and_refuses_altered_ones(keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedlite.protocol import ed25519

    public, signature = (bytes.fromhex(h) for h in RFC8032_TEST_1)
    assert ed25519.verify(public, signature, b"") and not ed25519.verify(public, signature, b"\0")
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for size in (0, 1, 1000):
        message = bytes(range(256)) * (size // 256) + b"m" * (size % 256)
        good = key.sign(message)
        assert ed25519.verify(raw, good, message)
        s_plus_order = (int.from_bytes(good[32:], "little") + ED25519_ORDER).to_bytes(32, "little")  # malleated S
        for bad in (good[:5] + bytes([good[5] ^ 1]) + good[6:], good[:40] + bytes([good[40] ^ 1]) + good[41:],
                    good[:32] + s_plus_order):
            assert not ed25519.verify(raw, bad, message)


def test_a_device_verifies_without_loading_cryptography(keys):
    (private, public), _ = keys
    envelope = Signer.from_file(private).sign("t", b"x")
    probe = (f"import sys; from fedlite.protocol.signing import Verifier\n"
             f"assert Verifier.from_files([{str(public)!r}]).verify('t', {envelope!r}) == b'x'\n"
             f"print(sorted(m for m in sys.modules if m.startswith('cryptography')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_file_that_is_not_an_ed25519_public_key_is_named(tmp_path, keys):
    (private, _), _ = keys
    for text in ("hello", private.read_text()):
        (tmp_path / "k.pub").write_text(text)
        with pytest.raises(ValueError, match=r"k\.pub is not an Ed25519 public key"):
            Verifier.from_files([str(tmp_path / "k.pub")])
