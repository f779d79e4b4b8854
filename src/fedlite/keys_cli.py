"""`fedlite keys`: the aggregator's Ed25519 signing key pair, and rotation."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = actions.add_parser("generate", help="write NAME.key (private, 0600) and NAME.pub into DIR")
    generate.add_argument("directory", type=Path, help="where the key files go (made if missing)")
    generate.add_argument("--name", default="aggregator", help="the key files' name: NAME.key and NAME.pub")
    show = actions.add_parser("show", help="print the key id of a public or private key file")
    show.add_argument("path", type=Path, help="a private key (.key) or public key (.pub) file")


def run(args: argparse.Namespace) -> int:
    from fedlite.protocol.signing import Signer, Verifier, generate_keypair

    if args.action == "generate":
        try:
            private, public = generate_keypair(args.directory, args.name)
        except FileExistsError as exc:
            print(f"fedlite keys: {exc}")
            return 2
        print(f"private key: {private}  -> aggregator.toml [signing] key_file\n"
              f"public key:  {public}  -> every agent's [trust] aggregator_keys\n"
              f"key id:      {Signer.from_file(private).key_id.hex()}")
        return 0
    try:
        key_id = Signer.from_file(args.path).key_id if args.path.suffix == ".key" else next(
            iter(Verifier.from_files([str(args.path)])._keys))
    except ValueError as exc:
        print(f"fedlite keys: {exc}")
        return 2
    print(key_id.hex())
    return 0
