#!/bin/sh
# Bramble first boot, written onto the boot partition by bramble-image.
#
# Runs once, as root: on Raspberry Pi OS Bookworm from cmdline.txt's systemd.run= (then
# the Pi reboots), on cloud-init systems (Raspberry Pi OS Trixie, Ubuntu) from user-data's
# runcmd. It installs the agent and its systemd unit, names the host after the board's
# serial number, installs the SSH key and the Wi-Fi connection, and removes the secrets it
# was handed from the boot partition whatever happens. Its log stays on the boot partition
# as bramble-firstboot.log.
#
# For tests, BRAMBLE_ROOT puts every file it installs under another directory and skips
# what would change the running system (hostname, systemctl, netplan apply);
# BRAMBLE_SERIAL_FILE and BRAMBLE_CPUINFO replace /proc's serial number sources.
set -u

here="$(cd "$(dirname "$0")" && pwd)"
boot="$(dirname "$here")"
root="${BRAMBLE_ROOT:-}"
exec >>"$boot/bramble-firstboot.log" 2>&1
echo "bramble first boot: $(date)"

# The join token and the Wi-Fi password must not outlive this script on a partition
# that any computer can read.
remove_secrets() {
    rm -f "$here/agent.env" "$here/wifi.nmconnection" "$here/wifi.netplan.yaml"
    sync
}
trap remove_secrets EXIT

# shellcheck source=/dev/null
. "$here/settings.env"

failed=0
fail() {
    echo "error: $*"
    failed=1
}
live() { [ -z "$root" ]; }

# Enables a unit the way `systemctl enable` would, also where systemd is not running.
enable_unit() {
    mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
    ln -sf "/etc/systemd/system/$1" "$root/etc/systemd/system/multi-user.target.wants/$1"
}

# --- the agent ---------------------------------------------------------------------
install -D -m 755 "$here/bramble-agent" "$root/usr/local/bin/bramble-agent" || fail "cannot install the agent binary"
# The cron gate, beside the agent, which finds it there.
if [ -f "$here/bramble-gate" ]; then
    install -D -m 755 "$here/bramble-gate" "$root/usr/local/bin/bramble-gate" || fail "cannot install the cron gate"
fi
install -D -m 644 "$here/bramble-agent.service" "$root/etc/systemd/system/bramble-agent.service" || fail "cannot install bramble-agent.service"
install -D -m 644 "$here/bramble-docker.service" "$root/etc/systemd/system/bramble-docker.service" || fail "cannot install bramble-docker.service"
install -d -m 700 "$root/etc/bramble"
install -m 600 "$here/agent.env" "$root/etc/bramble/agent.env" || fail "cannot install /etc/bramble/agent.env"
enable_unit bramble-agent.service
enable_unit bramble-docker.service

# --- hostname from the board's serial number ------------------------------------------
serial=""
serial_file="${BRAMBLE_SERIAL_FILE:-/proc/device-tree/serial-number}"
cpuinfo="${BRAMBLE_CPUINFO:-/proc/cpuinfo}"
[ -r "$serial_file" ] && serial="$(tr -d '\000' <"$serial_file")"
[ -n "$serial" ] || serial="$(sed -n 's/^Serial[[:space:]]*:[[:space:]]*//p' "$cpuinfo" 2>/dev/null)"
suffix="$(printf '%s' "$serial" | tr -cd '0-9a-fA-F' | tr 'A-F' 'a-f' | tail -c 6)"
if [ -z "$suffix" ]; then
    # Not a Pi (or no serial): the machine id is unique per installation too.
    suffix="$(tr -cd '0-9a-f' <"$root/etc/machine-id" 2>/dev/null | tail -c 6)"
fi
if [ -n "$suffix" ]; then
    name="$BRAMBLE_HOSTNAME_PREFIX-$suffix"
    old="$(tr -d ' \t\r\n' <"$root/etc/hostname" 2>/dev/null)"
    echo "$name" >"$root/etc/hostname"
    if grep -q '^127\.0\.1\.1' "$root/etc/hosts" 2>/dev/null; then
        sed -i "s/^127\.0\.1\.1.*/127.0.1.1\t$name/" "$root/etc/hosts"
    else
        printf '127.0.1.1\t%s\n' "$name" >>"$root/etc/hosts"
    fi
    # cloud-init would set the hostname back from its meta-data on every boot.
    if [ -d "$root/etc/cloud" ]; then
        mkdir -p "$root/etc/cloud/cloud.cfg.d"
        printf 'preserve_hostname: true\n' >"$root/etc/cloud/cloud.cfg.d/99-bramble.cfg"
    fi
    if live; then hostname "$name"; fi
    echo "hostname: $old -> $name"
else
    fail "no serial number and no machine id: hostname left as is"
fi

# --- SSH key --------------------------------------------------------------------------
if [ -f "$here/authorized_keys" ]; then
    user="$BRAMBLE_SSH_USER"
    if ! grep -q "^$user:" "$root/etc/passwd" 2>/dev/null; then
        if live && [ -x /usr/lib/userconf-pi/userconf ]; then
            # Raspberry Pi OS: renames its placeholder first user, and disables the
            # first-boot user wizard. '*' is a password hash nothing matches: key only.
            /usr/lib/userconf-pi/userconf "$user" '*' || fail "userconf $user failed"
        elif live; then
            useradd -m -s /bin/bash -G sudo "$user" || fail "useradd $user failed"
        fi
    fi
    home="$(grep "^$user:" "$root/etc/passwd" 2>/dev/null | cut -d: -f6)"
    [ -n "$home" ] || home="/home/$user"
    install -d -m 700 "$root$home/.ssh"
    touch "$root$home/.ssh/authorized_keys"
    while IFS= read -r key; do
        [ -n "$key" ] || continue
        grep -qxF "$key" "$root$home/.ssh/authorized_keys" || printf '%s\n' "$key" >>"$root$home/.ssh/authorized_keys"
    done <"$here/authorized_keys"
    chmod 600 "$root$home/.ssh/authorized_keys"
    if live; then
        chown -R "$user:" "$home/.ssh" || fail "chown $home/.ssh failed"
        systemctl enable ssh || fail "cannot enable ssh"
    fi
    # Key-only login needs sudo without a password.
    install -d -m 755 "$root/etc/sudoers.d"
    printf '%s ALL=(ALL) NOPASSWD: ALL\n' "$user" >"$root/etc/sudoers.d/010-bramble-$user"
    chmod 440 "$root/etc/sudoers.d/010-bramble-$user"
    echo "ssh key installed for $user"
fi

# --- Wi-Fi ----------------------------------------------------------------------------
if [ -f "$here/wifi.nmconnection" ] || [ -f "$here/wifi.netplan.yaml" ]; then
    if [ -d "$root/etc/NetworkManager" ]; then
        # Raspberry Pi OS: NetworkManager.
        install -D -m 600 "$here/wifi.nmconnection" "$root/etc/NetworkManager/system-connections/bramble-wifi.nmconnection" || fail "cannot install the Wi-Fi connection"
        if live && command -v raspi-config >/dev/null; then
            raspi-config nonint do_wifi_country "$BRAMBLE_WIFI_COUNTRY" || fail "cannot set the Wi-Fi country"
        fi
        # The Pi's Wi-Fi stays blocked until a country is set; unblock it for good.
        for f in "$root"/var/lib/systemd/rfkill/*:wlan; do
            [ -e "$f" ] && echo 0 >"$f"
        done
        if live; then rfkill unblock wifi 2>/dev/null; fi
        echo "wifi: NetworkManager connection bramble-wifi"
    elif [ -d "$root/etc/netplan" ]; then
        # Ubuntu: netplan (the file carries the country as regulatory-domain).
        install -m 600 "$here/wifi.netplan.yaml" "$root/etc/netplan/60-bramble-wifi.yaml" || fail "cannot install the Wi-Fi netplan"
        if live; then netplan apply || fail "netplan apply failed"; fi
        echo "wifi: netplan 60-bramble-wifi.yaml"
    else
        fail "neither NetworkManager nor netplan found: Wi-Fi not configured"
    fi
fi

# --- hand over ------------------------------------------------------------------------
remove_secrets
if [ "$BRAMBLE_OS" = bookworm ]; then
    # Run once: take the systemd.run hook out of cmdline.txt (keeping it one line).
    sed -i -e 's| systemd\.run=[^ ]*||g' -e 's| systemd\.run_success_action=[^ ]*||g' \
        -e 's| systemd\.unit=kernel-command-line\.target||g' "$boot/cmdline.txt"
    rm -f "$boot/firstrun.sh"
    # A firstrun.sh that was there before (e.g. Raspberry Pi Imager's) runs after ours.
    # It works on the real /boot, so it runs only on the Pi, not under BRAMBLE_ROOT.
    if [ -f "$here/firstrun-previous.sh" ] && live; then
        cp "$here/firstrun-previous.sh" "$boot/firstrun.sh"
        /bin/bash "$boot/firstrun.sh" || fail "the previous firstrun.sh failed"
    fi
elif live; then
    # cloud-init: no reboot follows, so start what was installed.
    systemctl daemon-reload
    systemctl start --no-block bramble-docker.service bramble-agent.service || fail "cannot start the agent"
fi

if [ "$failed" -eq 0 ]; then
    # Done: the agent binary's copy is no longer needed on the small boot partition.
    rm -rf "$here"
    echo "bramble first boot: done"
else
    echo "bramble first boot: finished with errors; $here is kept for a look"
fi
sync
exit 0
