"""Signed broadcasts: a pinned key verifies; unsigned, forged, replayed-elsewhere and unknown-key ones fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedlite.agent.config import load_config
from fedlite.protocol.signing import SignatureError, Signer, Verifier, generate_keypair
from fedlite.settings import ConfigError


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
