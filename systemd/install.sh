#!/usr/bin/env bash
# Install fedlite as a systemd service on Raspberry Pi OS / Debian (run as root; safe to re-run).
#
#   sudo systemd/install.sh --role agent                 # a device: pip install 'fedlite[agent]'
#   sudo systemd/install.sh --role agent --extra agent-legacy   # older Pi OS: tflite-runtime + numpy<2
#   sudo systemd/install.sh --role aggregator            # the server: 'fedlite[server]' and mosquitto
#
# Steps: (1) Debian packages (python3-venv; mosquitto for the aggregator), (2) system user `fedlite`,
# (3) venv in /opt/fedlite/.venv with fedlite installed, (4) /etc/fedlite (root:fedlite 0750) and, for
# an agent, /var/lib/fedlite-data, (5) the unit in /etc/systemd/system, (6) systemctl enable --now,
# once /etc/fedlite/<role>.toml exists (otherwise enabled only; write the config, then start it).
#
# Options:
#   --role agent|aggregator   which service (required)
#   --extra NAME              pip extra: agent, agent-legacy or server (default: agent / server)
#   --source SPEC             what pip installs: a name, a path to a checkout or a wheel (default: fedlite)
#   --python PATH             interpreter for the venv (default: python3)
#   --no-start                install and enable, do not start
#   --dry-run                 print the commands instead of running them
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PREFIX=/opt/fedlite
VENV="$PREFIX/.venv"
CONF_DIR=/etc/fedlite
DATA_DIR=/var/lib/fedlite-data
UNIT_DIR=/etc/systemd/system
SERVICE_USER=fedlite

ROLE=""
EXTRA=""
SOURCE="fedlite"
PYTHON="python3"
START=1
DRY_RUN=0

die() { echo "install.sh: error: $*" >&2; exit 2; }
say() { echo "==> $*"; }
run() {
    if [[ $DRY_RUN -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --role|--extra|--source|--python) [[ $# -ge 2 ]] || die "$1 needs a value" ;;
        esac
        case "$1" in
            --role) ROLE="$2"; shift 2 ;;
            --extra) EXTRA="$2"; shift 2 ;;
            --source) SOURCE="$2"; shift 2 ;;
            --python) PYTHON="$2"; shift 2 ;;
            --no-start) START=0; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
    done
    case "$ROLE" in
        agent) EXTRA="${EXTRA:-agent}" ;;
        aggregator) EXTRA="${EXTRA:-server}" ;;
        "") die "--role agent|aggregator is required" ;;
        *) die "--role must be agent or aggregator, not '$ROLE'" ;;
    esac
    case "$EXTRA" in
        agent|agent-legacy|server) ;;
        *) die "--extra must be agent, agent-legacy or server, not '$EXTRA'" ;;
    esac
    [[ -f "$HERE/fedlite-$ROLE.service" ]] || die "unit $HERE/fedlite-$ROLE.service not found"
    if [[ $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
        die "run as root (sudo $0 ...), or add --dry-run to see the steps"
    fi
}

install_packages() {
    local packages=()
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
    if [[ "$ROLE" == aggregator ]] && ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
        packages+=(mosquitto)
    fi
    if [[ ${#packages[@]} -gt 0 ]]; then
        say "installing Debian packages: ${packages[*]}"
        run apt-get update
        run apt-get install -y --no-install-recommends "${packages[@]}"
    fi
}

create_user() {
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    else
        say "creating system user $SERVICE_USER"
        run useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
}

install_venv() {
    say "installing '$SOURCE[$EXTRA]' into $VENV"
    run install -d -m 0755 "$PREFIX"
    [[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/pip" install --quiet --upgrade pip
    run "$VENV/bin/pip" install --quiet --upgrade "$SOURCE[$EXTRA]"
}

create_dirs() {
    say "creating $CONF_DIR"
    run install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
    if [[ "$ROLE" == agent && ! -d "$DATA_DIR" ]]; then
        say "creating $DATA_DIR (the device application's data; the agent only reads it)"
        run install -d -m 0755 "$DATA_DIR"
    fi
}

install_unit() {
    say "installing $UNIT_DIR/fedlite-$ROLE.service"
    run install -m 0644 "$HERE/fedlite-$ROLE.service" "$UNIT_DIR/fedlite-$ROLE.service"
    run systemctl daemon-reload
}

enable_service() {
    local unit="fedlite-$ROLE.service" config="$CONF_DIR/$ROLE.toml"
    if [[ $START -eq 1 && -f "$config" ]]; then
        say "enabling and starting $unit"
        run systemctl enable --now "$unit"
        run systemctl try-restart "$unit"  # an upgrade: pick up the new code
    else
        say "enabling $unit"
        run systemctl enable "$unit"
        [[ -f "$config" ]] || say "next: write $config (root:$SERVICE_USER, mode 0640), then: systemctl start $unit"
    fi
    if [[ "$ROLE" == aggregator ]]; then
        say "broker: $VENV/bin/fedlite broker init /var/lib/fedlite-broker --federation NAME --bind 0.0.0.0"
        say "        and point mosquitto.service at /var/lib/fedlite-broker/mosquitto.conf"
    fi
}

main() {
    parse_args "$@"
    install_packages
    create_user
    install_venv
    create_dirs
    install_unit
    enable_service
    say "done"
}

main "$@"
