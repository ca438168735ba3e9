#!/bin/sh
# mmdebstrap --essential-hook of image/build.sh: runs after the essential packages are installed,
# before the others (so before the kernel). Usage: essential.sh ROOT MODULES_MODE [MODULE...]
#
# - the initramfs settings, which the first (and only) initramfs must use;
# - programs that are slow under emulation and would run more than once, diverted to no-ops for
#   the rest of mmdebstrap (build.sh restores them and runs each once): update-initramfs (the
#   kernel's postinst and initramfs-tools' trigger would each build the initramfs) and
#   update-ca-certificates (configure and trigger);
# - SSH host keys as empty placeholders, so openssh-server's postinst spends no time making keys
#   that must not ship anyway (each device makes its own; build.sh removes the placeholders).
set -eu
root=$1
mode=$2
shift 2

mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/usr/share/initramfs-tools/modules.d"
printf 'MODULES=%s\nRESUME=none\n' "$mode" >"$root/etc/initramfs-tools/conf.d/flux-edge-image.conf"
: >"$root/usr/share/initramfs-tools/modules.d/flux-edge-image"
for module in "$@"; do
    echo "$module" >>"$root/usr/share/initramfs-tools/modules.d/flux-edge-image"
done

for prog in /usr/sbin/update-initramfs /usr/sbin/update-ca-certificates; do
    chroot "$root" dpkg-divert --quiet --local --rename --divert "$prog.flux-edge-image" --add "$prog"
    printf '#!/bin/sh\nexit 0\n' >"$root$prog"
    chmod 0755 "$root$prog"
done

mkdir -p "$root/etc/ssh"
for type in rsa ecdsa ed25519; do
    : >"$root/etc/ssh/ssh_host_${type}_key"
done
