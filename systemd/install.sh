#!/usr/bin/env bash
# Install fedlite as a systemd service on Raspberry Pi OS / Debian (run as root; safe to re-run).
#
#   sudo systemd/install.sh --role agent                 # a device: this checkout with the `agent` extra
#   sudo systemd/install.sh --role agent --extra agent-legacy   # older Pi OS: tflite-runtime + numpy<2
#   sudo systemd/install.sh --role aggregator            # the server: the `server` extra and mosquitto
#
# Steps: (1) Debian packages (python3-venv; mosquitto for the aggregator), (2) system user `fedlite`,
# (3) venv in /opt/fedlite/.venv with fedlite installed, (4) /etc/fedlite (root:fedlite 0750) with the
# example config /etc/fedlite/<role>.toml.example and, for an agent, /var/lib/fedlite-data, (5) the unit in
# /etc/systemd/system and, for the aggregator, the drop-in mosquitto.service.d/fedlite.conf that runs
# Mosquitto on the config `fedlite broker init BROKER_DIR` generates, (6) systemctl enable --now, once
# /etc/fedlite/<role>.toml exists (otherwise enabled only; write the config, then start it).
#
# Options:
#   --role agent|aggregator   which service (required)
#   --extra NAME              pip extra: agent, agent-legacy or server (default: agent / server)
#   --source SPEC             what pip installs: a name, a path to a checkout or a wheel
#                             (default: the checkout this script is in)
#   --python PATH             interpreter for the venv (default: python3)
#   --broker-dir DIR          the aggregator's broker directory (default: /var/lib/fedlite-broker)
#   --dest-root DIR           stage the files (units, drop-in, example configs) under DIR instead of /,
#                             for a package build: no packages, user, venv, ownership or systemctl
#   --no-start                install and enable, do not start
#   --dry-run                 print the commands instead of running them
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(dirname "$HERE")"
EXAMPLES="$CHECKOUT/deploy/examples"
PREFIX=/opt/fedlite
VENV="$PREFIX/.venv"
CONF_DIR=/etc/fedlite
DATA_DIR=/var/lib/fedlite-data
UNIT_DIR=/etc/systemd/system
SERVICE_USER=fedlite
BROKER_DIR=/var/lib/fedlite-broker
MOSQUITTO=/usr/sbin/mosquitto

ROLE=""
EXTRA=""
SOURCE=""
PYTHON="python3"
DEST_ROOT=""
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
            --role|--extra|--source|--python|--broker-dir|--dest-root) [[ $# -ge 2 ]] || die "$1 needs a value" ;;
        esac
        case "$1" in
            --role) ROLE="$2"; shift 2 ;;
            --extra) EXTRA="$2"; shift 2 ;;
            --source) SOURCE="$2"; shift 2 ;;
            --python) PYTHON="$2"; shift 2 ;;
            --broker-dir) BROKER_DIR="$2"; shift 2 ;;
            --dest-root) DEST_ROOT="$2"; shift 2 ;;
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
    [[ -f "$EXAMPLES/$ROLE.toml" ]] || die "example config $EXAMPLES/$ROLE.toml not found"
    [[ "$BROKER_DIR" == /* ]] || die "--broker-dir must be an absolute path, not '$BROKER_DIR'"
    if [[ -z "$SOURCE" ]]; then
        [[ -f "$CHECKOUT/pyproject.toml" ]] || die "no checkout at $CHECKOUT: give --source (a name, a checkout or a wheel)"
        SOURCE="$CHECKOUT"
    fi
    if [[ -n "$DEST_ROOT" ]]; then
        [[ -d "$DEST_ROOT" ]] || die "--dest-root $DEST_ROOT is not a directory"
        DEST_ROOT="$(cd "$DEST_ROOT" && pwd)"
        return  # staging files only: no root needed
    fi
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

# install -d owned root:fedlite, or without an owner when staging under --dest-root
install_dir() {
    local mode="$1" dir="$2"
    if [[ -n "$DEST_ROOT" ]]; then
        run install -d -m "$mode" "$DEST_ROOT$dir"
    else
        run install -d -m "$mode" -o root -g "$SERVICE_USER" "$dir"
    fi
}

create_dirs() {
    say "creating $CONF_DIR"
    install_dir 0750 "$CONF_DIR"
    if [[ "$ROLE" == agent && ( -n "$DEST_ROOT" || ! -d "$DATA_DIR" ) ]]; then
        say "creating $DATA_DIR (the device application's data; the agent only reads it)"
        run install -d -m 0755 "$DEST_ROOT$DATA_DIR"
    fi
}

install_example() {
    local example="$CONF_DIR/$ROLE.toml.example"
    say "installing $example (copy it to $CONF_DIR/$ROLE.toml and edit it)"
    if [[ -n "$DEST_ROOT" ]]; then
        run install -m 0644 "$EXAMPLES/$ROLE.toml" "$DEST_ROOT$example"
    else
        run install -m 0640 -o root -g "$SERVICE_USER" "$EXAMPLES/$ROLE.toml" "$example"
    fi
}

install_unit() {
    say "installing $UNIT_DIR/fedlite-$ROLE.service"
    run install -d -m 0755 "$DEST_ROOT$UNIT_DIR"
    run install -m 0644 "$HERE/fedlite-$ROLE.service" "$DEST_ROOT$UNIT_DIR/fedlite-$ROLE.service"
    if [[ "$ROLE" == aggregator ]]; then
        install_mosquitto_dropin
    fi
    if [[ -z "$DEST_ROOT" ]]; then
        run systemctl daemon-reload
    fi
}

# Debian's mosquitto.service runs /etc/mosquitto/mosquitto.conf: run the generated one instead, once it exists.
install_mosquitto_dropin() {
    local dir="$UNIT_DIR/mosquitto.service.d" config="$BROKER_DIR/mosquitto.conf"
    say "installing $dir/fedlite.conf (mosquitto runs $config)"
    run install -d -m 0755 "$DEST_ROOT$dir"
    if [[ $DRY_RUN -eq 1 ]]; then
        echo "+ write $DEST_ROOT$dir/fedlite.conf: ExecStart=$MOSQUITTO -c $config"
        return
    fi
    printf '%s\n' \
        "# Written by fedlite's install.sh: Mosquitto runs the config \`fedlite broker init $BROKER_DIR\` generates." \
        "[Unit]" \
        "ConditionPathExists=$config" \
        "" \
        "[Service]" \
        "ExecStart=" \
        "ExecStart=$MOSQUITTO -c $config" > "$DEST_ROOT$dir/fedlite.conf"
    chmod 0644 "$DEST_ROOT$dir/fedlite.conf"
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
        say "broker: $VENV/bin/fedlite broker init $BROKER_DIR --federation NAME --bind 0.0.0.0"
        say "        then: systemctl restart mosquitto (its drop-in runs $BROKER_DIR/mosquitto.conf)"
    fi
}

main() {
    parse_args "$@"
    if [[ -n "$DEST_ROOT" ]]; then
        create_dirs
        install_example
        install_unit
        say "staged under $DEST_ROOT"
        return
    fi
    install_packages
    create_user
    install_venv
    create_dirs
    install_example
    install_unit
    enable_service
    say "done"
}

main "$@"
