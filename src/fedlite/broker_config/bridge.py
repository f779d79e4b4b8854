"""An edge site's broker bridged to the central one: which topics cross, in which direction, over TLS.

The site's devices and its aggregator talk to the site broker only. Down the bridge come what the central
aggregator broadcasts (round, model, weights, deltas, deployment, all signed and retained) and the cluster's brief
and this site's grants; up go the devices' statuses and reports (small) and the site aggregator's claims,
presence and one partial sum per round. Device updates never cross: central traffic per round grows with the
number of sites, not of devices.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from fedlite.protocol import topics

_DOWN = ("round", "model/#", "weights/#", "delta/#", "deploy", "cluster/brief")


@dataclass(frozen=True)
class Bridge:
    """Where the site broker connects, as whom; read from the site's credentials file on the central broker
    (`fedlite broker site`). The password is written to the bridge's own conf file (0600), not kept here."""

    site: str
    host: str
    port: int
    ca_file: str
    username: str

    @property
    def connection(self) -> str:
        return f"fedlite-site-{self.site}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bridge_topics(federation: str, site: str) -> list[str]:
    """The `topic` lines of the bridge for one federation, no prefix remapping. QoS 1, except claims and grants:
    they cross at QoS 0, since Mosquitto does not set TCP_NODELAY on a bridge's own socket and a QoS 1 exchange
    over it then waits some 40 ms for delayed acknowledgements (at QoS 0 under 1 ms). A claim or grant lost
    with the link times out at the site aggregator (`cluster.claim_timeout_seconds`): that update is refused
    there, and the coordinator drops the claim at close; nothing is counted twice."""
    root = f"{topics.ROOT}/{federation}"
    down = [f"{root}/{t}" for t in _DOWN]
    up = [topics.all_statuses(federation), topics.all_reports(federation),
          *(topics.cluster_topic(federation, kind, site) for kind in ("partial", "member"))]
    return ([f"topic {t} in 1" for t in down] + [f"topic {topics.cluster_topic(federation, 'grant', site)} in 0"]
            + [f"topic {t} out 1" for t in up] + [f"topic {topics.cluster_topic(federation, 'claim', site)} out 0"])


def read_credentials(path: str | os.PathLike, host: str | None = None) -> tuple[Bridge, str]:
    """(the bridge, its password) from a site credentials file; `host` overrides the central broker's address
    (the file names it as the central broker's own host sees it)."""
    from fedlite.broker_config.credentials import load_credentials

    try:
        values = load_credentials(path)
        site, broker = values["site"], values["broker"]
        if not broker.get("tls"):
            raise ValueError("the central broker has no TLS listener for it: sites bridge over TLS only")
        bridge = Bridge(site=topics.check_id(site["name"], "site name"), host=host or str(broker["host"]),
                        port=int(broker["port"]), ca_file=str(Path(broker["ca_file"]).resolve()),
                        username=str(broker["username"]))
        return bridge, str(broker["password"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a site credentials file (`fedlite broker site` writes one): "
                         f"missing {exc}") from None


def render_bridge(bridge: Bridge, password: str, federations: list[str]) -> str:
    """The bridge's conf file (included by mosquitto.conf)."""
    template = Template(resources.files("fedlite.broker_config").joinpath("bridge.conf.tmpl").read_text())
    lines = [line for f in federations for line in bridge_topics(f, bridge.site)]
    return template.substitute(connection=bridge.connection, host=bridge.host, port=bridge.port,
                               username=bridge.username, password=password, ca_file=bridge.ca_file,
                               site=bridge.site, topics="\n".join(lines))
