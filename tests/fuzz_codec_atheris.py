"""Coverage-guided fuzzing of the wire parsers with atheris (optional; pytest does not collect this file).

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz_codec_atheris.py -max_total_time=60 [-atheris_runs=N] [corpus_dir ...]

The first input byte picks the target: `protocol.codec.decode` (frames; seeds are real update, weights and
model frames, compressed and not) or `protocol.messages.from_json` for one control message type. Either
must return or raise its own error (`CodecError` / `MessageError`), and a decoded frame holds no NaN or Inf;
anything else is a crash that libFuzzer reports with the input that caused it. A fresh seed corpus is
written to a temporary directory when no corpus directory is given.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    from fedlite.protocol.codec import CodecError, Header, Limits, decode, encode_model, encode_update, encode_weights
    from fedlite.protocol.messages import (
        DeployInstruction,
        DeviceReport,
        DeviceStatus,
        MessageError,
        RoundAnnouncement,
        from_json,
        to_json,
    )

LIMITS = Limits(max_payload_bytes=1 << 20, max_decoded_bytes=4 << 20, max_tensors=256, max_header_bytes=64 << 10)
MESSAGES = [RoundAnnouncement, DeviceStatus, DeviceReport, DeployInstruction]
DECODE = 0  # selector byte values: 0 decode, 1 + i from_json(MESSAGES[i])


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, payload = data[0] % (1 + len(MESSAGES)), data[1:]
    if target == DECODE:
        try:
            message = decode(payload, limits=LIMITS)
        except CodecError:
            return
        for name, tensor in message.tensors.items():  # what decode returns is finite (it refuses NaN and Inf)
            if tensor.dtype != np.uint8 and not np.all(np.isfinite(tensor)):
                raise AssertionError(f"decode returned a non-finite tensor {name!r}")
    else:
        with contextlib.suppress(MessageError):
            from_json(MESSAGES[target - 1], payload)


def seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    delta = {"dense/kernel": rng.normal(size=(6, 4)).astype(np.float32), "dense/bias": np.zeros(4, np.float32)}
    head = Header(kind="update", federation="fed", round=1, model_hash="ab" * 32, client_id="dev-1",
                  num_examples=5, metrics={"loss": 0.5}, sent_at=1.0)
    frames = [encode_update(delta, head, compress=c) for c in (True, False)]
    frames += [encode_weights(delta, head, dtype=d, compress=c) for d in ("float16", "float32") for c in (True, False)]
    frames += [encode_model(b"TFL3" + bytes(40), head, compress=c) for c in (True, False)]
    messages = [RoundAnnouncement("fed", 1, "ab", "t/m", "t/w", ["dev-1"], 1.5), DeviceStatus("dev-1", "online"),
                DeviceReport("dev-1", 1, "declined", "idle: busy"), DeployInstruction("fed", "d1", None, None)]
    return [bytes([DECODE]) + f for f in frames] + [bytes([1 + i]) + to_json(m) for i, m in enumerate(messages)]


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        corpus = Path(tempfile.mkdtemp(prefix="fedlite-fuzz-corpus-"))
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i:02d}").write_bytes(seed)
        args.append(str(corpus))
    atheris.Setup([sys.argv[0], *args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
