#!/bin/sh
# customize.sh ROOT AGENT REPL TEMPLATE_DIR TEMPLATE
# Turns a debootstrapped tree into a podflare base image tree. Runs on the
# host (not chrooted) after mmdebstrap; every step is plain file work.
set -eu
root=$1 agent=$2 repl=$3 recipes=$4 template=$5

# The agent is PID 1 (the kernel command line says init=/sbin/podflare-agent).
install -m 0755 "$agent" "$root/sbin/podflare-agent"
install -d -m 0755 "$root/usr/lib/podflare"
install -m 0644 "$repl" "$root/usr/lib/podflare/repl.py"

# Mount point of the tmpfs that holds the overlay's upper layer (the agent
# builds the writable root there; the base image itself stays read-only).
install -d -m 0755 "$root/mnt/overlay-root"
install -d -m 0700 "$root/root"
install -d -m 1777 "$root/tmp"

# Modules the REPL imports before the template snapshot is taken.
install -d -m 0755 "$root/etc/podflare"
if [ -f "$recipes/$template.warmup" ]; then
    install -m 0644 "$recipes/$template.warmup" "$root/etc/podflare/warmup"
fi

echo sandbox >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	sandbox
::1		localhost ip6-localhost ip6-loopback
HOSTS

# The resolver is the sandbox's gateway: hostd forwards its port 53 to the
# host's resolver (PODFLARE_NET_DNS), so the image names no real server. Short
# timeouts: a sandbox without egress is refused at once anyway.
rm -f "$root/etc/resolv.conf"
cat >"$root/etc/resolv.conf" <<'RESOLV'
nameserver 172.16.0.1
options timeout:2 attempts:2
RESOLV

# Every sandbox must get its own randomness (the host credits fresh entropy
# at boot and after each restore): ship no saved seed or machine identity.
rm -f "$root/var/lib/systemd/random-seed" "$root/var/lib/urandom/random-seed" \
    "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"
# Left-overs of the build that the image does not need.
rm -rf "$root/var/cache/apt/"* "$root/var/lib/apt/lists/"* "$root/var/cache/debconf/"*-old \
    "$root/var/log/"* "$root/usr/share/doc-base"
