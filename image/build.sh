#!/usr/bin/env bash
# Build the flux-edge appliance image: a Debian trixie root filesystem (arm64 for the Raspberry
# Pi, or an amd64 twin for testing) provisioned by the project's Ansible role, assembled into a
# partitioned A/B .img (MBR: FAT "RASPIFIRM", root slots A and B, data partition "FLUXDATA") and
# compressed; with --bundle also a signed RAUC update bundle of the same root filesystem.
# See image/README.md.
#
#   image/build.sh [--arch arm64|amd64] [--out DIR] [--config FILE] [--test-initramfs]
#                  [--wheelhouse DIR] [--xz] [--mirror URL] [--keep-work]
#                  [--bundle] [--version V] [--keyring CA.pem] [--signing-cert C] [--signing-key K]
#                  [--slot-size MIB]
#
# Runs as root on a Debian/Ubuntu x86_64 host. It works in a private mount namespace (every mount
# it makes vanishes with it, even on a crash), uses no loop devices, and undoes the binfmt_misc
# state it changed for arm64 emulation when it ends, however it ends.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
    exit "${1:-0}"
}

ARCH=arm64
OUT=$HERE/build
CONFIG=$HERE/config/flux-edge.toml
TEST_INITRAMFS=0
WHEELHOUSE=""
XZ=0
KEEP_WORK=0
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
SUITE=trixie
PYVER=3.13                      # trixie's python3: the wheelhouse is built for it
BUNDLE=0
VERSION=""
KEYRING=""
SIGNING_CERT=""
SIGNING_KEY=""
SLOT_MIB=2048
# the MBR disk signature: partitions are found as PARTUUID=464c5845-0N ("FLXE") on every card
DISK_ID=464c5845
args=("$@")
while [ $# -gt 0 ]; do
    case $1 in
        --arch) ARCH=${2:?--arch needs a value}; shift 2 ;;
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --test-initramfs) TEST_INITRAMFS=1; shift ;;
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a directory}; shift 2 ;;
        --xz) XZ=1; shift ;;
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --keep-work) KEEP_WORK=1; shift ;;
        --bundle) BUNDLE=1; shift ;;
        --version) VERSION=${2:?--version needs a value}; shift 2 ;;
        --keyring) KEYRING=${2:?--keyring needs a file}; shift 2 ;;
        --signing-cert) SIGNING_CERT=${2:?--signing-cert needs a file}; shift 2 ;;
        --signing-key) SIGNING_KEY=${2:?--signing-key needs a file}; shift 2 ;;
        --slot-size) SLOT_MIB=${2:?--slot-size needs MiB}; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done

die() { echo "build.sh: error: $*" >&2; exit 1; }
log() { printf '[%4ds] %s\n' $((SECONDS)) "$*"; }

case $ARCH in
    arm64) KERNEL_PKG=linux-image-arm64; QEMU_BINFMT=qemu-aarch64; COMPATIBLE=flux-edge-rpi-arm64 ;;
    amd64) KERNEL_PKG=linux-image-amd64; QEMU_BINFMT=""; COMPATIBLE=flux-edge-pc-amd64 ;;
    *) die "--arch must be arm64 or amd64, not '$ARCH'" ;;
esac
[[ $SLOT_MIB =~ ^[0-9]+$ ]] && [ "$SLOT_MIB" -ge 512 ] || die "--slot-size must be a number of MiB >= 512"
# the version every slot and bundle carries: flux-edge's own, the build date, the commit
if [ -z "$VERSION" ]; then
    fe_version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n 1)
    commit=$(git -C "$REPO" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
    VERSION="${fe_version:-0}+$(date -u +%Y%m%d%H%M).g$commit"
fi
[[ $VERSION =~ ^[A-Za-z0-9.+~_-]+$ ]] || die "--version '$VERSION': letters, digits and . + ~ _ - only"
# the bundle signing material: given, or the development CA in image/keys/ (made once)
if [ -z "$KEYRING" ] && [ -z "$SIGNING_CERT" ] && [ -z "$SIGNING_KEY" ]; then
    DEV_KEYS=1
    KEYRING=$HERE/keys/ca.cert.pem
    SIGNING_CERT=$HERE/keys/signing.cert.pem
    SIGNING_KEY=$HERE/keys/signing.key.pem
else
    DEV_KEYS=0
    [ -n "$KEYRING" ] || die "--keyring is needed with --signing-cert/--signing-key"
    [ -f "$KEYRING" ] || die "--keyring $KEYRING: no such file"
    if [ "$BUNDLE" -eq 1 ]; then
        [ -f "$SIGNING_CERT" ] && [ -f "$SIGNING_KEY" ] \
            || die "--bundle needs --signing-cert and --signing-key (files) with --keyring"
    fi
fi
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, chroot, mounts)"
[ "$(uname -m)" = x86_64 ] || die "the builder runs on an x86_64 host, this is $(uname -m)"
CONFIG=$(readlink -f "$CONFIG")
[ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
[ -z "$WHEELHOUSE" ] || WHEELHOUSE=$(readlink -f "$WHEELHOUSE")
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")
if [ "$DEV_KEYS" -eq 1 ] && [ ! -f "$KEYRING" ]; then
    "$HERE/make-dev-keys.sh" "$HERE/keys" >&2 || die "could not make the development keys"
fi
KEYRING=$(readlink -f "$KEYRING")
[ -z "$SIGNING_CERT" ] || SIGNING_CERT=$(readlink -f "$SIGNING_CERT")
[ -z "$SIGNING_KEY" ] || SIGNING_KEY=$(readlink -f "$SIGNING_KEY")

# --- every mount of this build lives in a private mount namespace ---------------------------
if [ -z "${FLUX_EDGE_IMAGE_NS:-}" ]; then
    command -v unshare >/dev/null || die "unshare (util-linux) is missing"
    export FLUX_EDGE_IMAGE_NS=$$
    exec unshare --mount --propagation private -- "$0" "${args[@]}"
fi

ANSIBLE_PLAYBOOK=${ANSIBLE_PLAYBOOK:-}
if [ -z "$ANSIBLE_PLAYBOOK" ]; then
    if [ -x "$REPO/.venv/bin/ansible-playbook" ]; then
        ANSIBLE_PLAYBOOK=$REPO/.venv/bin/ansible-playbook
    else
        ANSIBLE_PLAYBOOK=$(command -v ansible-playbook || true)
    fi
fi
missing=()
for tool in mmdebstrap genimage mke2fs mkfs.vfat mcopy zstd chroot findmnt openssl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -n "$ANSIBLE_PLAYBOOK" ] || missing+=(ansible-playbook)
[ "$XZ" -eq 0 ] || command -v xz >/dev/null || missing+=(xz)
if [ "$BUNDLE" -eq 1 ]; then
    command -v rauc >/dev/null || missing+=(rauc)
    command -v mksquashfs >/dev/null || missing+=(mksquashfs)
fi
if [ -n "$QEMU_BINFMT" ]; then
    command -v update-binfmts >/dev/null || missing+=(update-binfmts)
    [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -e /usr/bin/qemu-aarch64-static ] \
        || missing+=(qemu-aarch64-static)
fi
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (Debian: apt-get install mmdebstrap" \
    "genimage e2fsprogs dosfstools mtools zstd qemu-user-static binfmt-support rauc squashfs-tools;" \
    "ansible from pip)"

NAME=flux-edge-$SUITE-$ARCH
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/flux-edge-image.XXXXXX")
ROOT=$WORK/rootfs
case $ROOT in /?*/flux-edge-image.*/rootfs) ;; *) die "unexpected work directory $ROOT" ;; esac
# the bind mounts and chroot mounts below must never reach the host's mount table
[ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] \
    || die "not in a private mount namespace"
FIRMWARE=$WORK/firmware
BINFMT_ENABLED_BY_US=0

cleanup() {
    local rc=$?
    set +e
    # processes a maintainer script or a task may have left running inside the chroot
    if [ -d "$ROOT" ]; then
        local p
        for p in /proc/[0-9]*; do
            [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOT" ] && kill -KILL "${p#/proc/}" 2>/dev/null
        done
    fi
    if [ "$BINFMT_ENABLED_BY_US" -eq 1 ]; then
        update-binfmts --disable "$QEMU_BINFMT" >/dev/null 2>&1 \
            || echo "build.sh: warning: could not disable binfmt $QEMU_BINFMT" >&2
    fi
    if [ "$KEEP_WORK" -eq 1 ]; then
        echo "build.sh: work directory kept: $WORK" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    [ "$rc" -eq 0 ] || echo "build.sh: FAILED after ${SECONDS}s (exit $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }

# --- foreign architecture: qemu-user through binfmt_misc -------------------------------------
if [ -n "$QEMU_BINFMT" ]; then
    # this namespace's own view of binfmt_misc; the registrations themselves are system-wide
    if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    fi
    if ! grep -qx enabled "/proc/sys/fs/binfmt_misc/$QEMU_BINFMT" 2>/dev/null; then
        update-binfmts --enable "$QEMU_BINFMT"
        BINFMT_ENABLED_BY_US=1
    fi
    grep -qx enabled "/proc/sys/fs/binfmt_misc/$QEMU_BINFMT" \
        || die "binfmt $QEMU_BINFMT could not be enabled"
fi

# --- 1. root filesystem -----------------------------------------------------------------------
PACKAGES=(systemd-sysv udev dbus kmod initramfs-tools zstd "$KERNEL_PKG"
          openssh-server wpasupplicant wireless-regdb cloud-guest-utils fdisk
          python3 python3-venv procps e2fsprogs dosfstools ca-certificates
          systemd-timesyncd systemd-resolved sudo iproute2 netbase tzdata rauc rauc-service)
# the Pi: its firmware and Wi-Fi firmware; the amd64 twin: GRUB (BIOS), which RAUC switches
[ "$ARCH" = arm64 ] && PACKAGES+=(raspi-firmware firmware-brcm80211)
[ "$ARCH" = amd64 ] && PACKAGES+=(grub-pc-bin grub-common)
if [ "$TEST_INITRAMFS" -eq 1 ]; then
    # enough to mount the root filesystem on a virtual disk (and on a Pi's SD card slot)
    INITRAMFS_MODULES="virtio_pci virtio_mmio virtio_blk ext4 vfat"
    [ "$ARCH" = arm64 ] && INITRAMFS_MODULES+=" mmc_block sdhci_iproc bcm2835"
    INITRAMFS_MODE=list
else
    INITRAMFS_MODULES=""
    INITRAMFS_MODE=most
fi

# The wheels for the device are fetched (natively, from the package index) while the root
# filesystem builds.
t0=$SECONDS
WHEELHOUSE_PID=""
if [ -z "$WHEELHOUSE" ]; then
    [ -x "$REPO/tools/build-wheelhouse.sh" ] || die "tools/build-wheelhouse.sh is missing"
    WHEELHOUSE=$WORK/wheelhouse
    case $ARCH in arm64) wh_arch=aarch64 ;; *) wh_arch=x86_64 ;; esac
    log "wheelhouse: tools/build-wheelhouse.sh $wh_arch for Python $PYVER (in the background)"
    "$REPO/tools/build-wheelhouse.sh" "$wh_arch" "$WHEELHOUSE" "$PYVER" >"$WORK/wheelhouse.log" 2>&1 &
    WHEELHOUSE_PID=$!
fi

# image/hooks/essential.sh: initramfs settings, slow programs diverted, SSH key placeholders

log "rootfs: mmdebstrap $SUITE $ARCH (initramfs MODULES=$INITRAMFS_MODE)"
comp=main,non-free-firmware
# merged-usr hooks: /usr merged by directory links as debootstrap does, so the usrmerge package
# (and the perl it needs, slow to install under emulation) is not pulled in
mmdebstrap --mode=root --arch="$ARCH" --variant=minbase --format=directory \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --essential-hook="'$HERE/hooks/essential.sh' \"\$1\" $INITRAMFS_MODE $INITRAMFS_MODULES" \
    "$SUITE" "$ROOT" \
    "deb $MIRROR $SUITE ${comp//,/ }" \
    "deb $MIRROR $SUITE-updates ${comp//,/ }" \
    "deb $SECURITY_MIRROR $SUITE-security ${comp//,/ }" \
    >"$WORK/mmdebstrap.log" 2>&1 || { tail -n 40 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
[ -x "$ROOT/usr/bin/dpkg" ] || die "mmdebstrap left no root filesystem in $ROOT"
rm -f "$ROOT"/etc/ssh/ssh_host_*
for prog in /usr/sbin/update-initramfs /usr/sbin/update-ca-certificates; do
    rm -f "$ROOT$prog"
    in_root dpkg-divert --quiet --local --rename --remove "$prog"
    [ -x "$ROOT$prog" ] || die "could not restore $prog in the image"
done
KVER=$(basename "$(find "$ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)")
KVER=${KVER#vmlinuz-}
[ -n "$KVER" ] || die "no kernel in the image's /boot"
log "rootfs: packages installed; certificates, initramfs for $KVER"
if [ -n "$WHEELHOUSE_PID" ]; then
    wait "$WHEELHOUSE_PID" || { tail -n 30 "$WORK/wheelhouse.log" >&2; die "building the wheelhouse failed"; }
    log "wheelhouse: $(find "$WHEELHOUSE" -name '*.whl' | wc -l) wheels"
fi
# what programs in the chroot expect (ischroot, kernel hooks, Ansible's modules); taken down
# before the filesystems are made
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
mount -t tmpfs tmpfs "$ROOT/run"
mount -t tmpfs tmpfs "$ROOT/tmp"
# The certificate store, made by the image's own update-ca-certificates (a shell script) with the
# host's shell and openssl where the host has them: seconds instead of half a minute emulated.
# The image's directories are bind-mounted over the host's paths in this build's private mount
# namespace (the host never sees them), so the links it makes name the right paths.
ca_paths=(/etc/ssl /usr/share/ca-certificates /usr/local/share/ca-certificates
          /etc/ca-certificates /etc/ca-certificates.conf)
native_ca=1
command -v openssl >/dev/null || native_ca=0
for d in "${ca_paths[@]}"; do [ -e "$d" ] && [ -e "$ROOT$d" ] || native_ca=0; done
if [ "$native_ca" -eq 1 ]; then
    (
        set -e
        for d in "${ca_paths[@]}"; do mount --bind "$ROOT$d" "$d"; done
        sh "$ROOT/usr/sbin/update-ca-certificates" --fresh >/dev/null
    ) || die "update-ca-certificates failed"
    # in a subshell's mounts are still this namespace's: take them down before anything else
    for d in "${ca_paths[@]}"; do umount "$d"; done
else
    in_root update-ca-certificates --fresh >/dev/null || die "update-ca-certificates failed"
fi
[ -s "$ROOT/etc/ssl/certs/ca-certificates.crt" ] || die "no /etc/ssl/certs/ca-certificates.crt"
# The initramfs (half a minute or more, emulated) is made while Ansible runs: both are
# single-threaded, and the role does not touch the kernel or /boot.
in_root update-initramfs -c -k "$KVER" >"$WORK/initramfs.log" 2>&1 &
INITRAMFS_PID=$!
T_ROOTFS=$((SECONDS - t0))
log "rootfs: done in ${T_ROOTFS}s"

# --- 2. the image's own system settings -------------------------------------------------------
log "system: overlay, fstab, host name, users, units"
cp -a --no-preserve=ownership "$HERE/rootfs/." "$ROOT/"
# modes as a package would set them, whatever the checkout's umask made of them
(cd "$HERE/rootfs" && find . -type f) | while read -r f; do
    if [ -x "$HERE/rootfs/$f" ]; then chmod 0755 "$ROOT/$f"; else chmod 0644 "$ROOT/$f"; fi
done
chmod 0440 "$ROOT/etc/sudoers.d/50-flux-edge-admin"
mkdir -p "$ROOT/usr/local/share/doc/flux-edge-image"
cp "$HERE/README.md" "$ROOT/usr/local/share/doc/flux-edge-image/README.md"
# / is the slot the boot loader chose (root=PARTUUID=...-02 or -03 on the kernel command line,
# mounted rw,noatime by the initramfs): it has no line here, so one root filesystem fits both slots.
cat >"$ROOT/etc/fstab" <<EOF
# flux-edge image (A/B). noatime: reading a file does not write to the SD card.
# The root filesystem is slot A (partition 2) or B (partition 3), as the boot loader chose.
LABEL=RASPIFIRM          /boot/firmware  vfat   rw,noatime,umask=0077,shortname=mixed   0 2
# the data partition: configuration and state that every update keeps
PARTUUID=$DISK_ID-04     /data           ext4   rw,noatime,errors=remount-ro            0 2
/data/flux-edge/etc      /etc/flux-edge      none  bind,x-systemd.requires-mounts-for=/data  0 0
/data/flux-edge/state    /var/lib/flux-edge  none  bind,x-systemd.requires-mounts-for=/data  0 0
/data/home               /home               none  bind,x-systemd.requires-mounts-for=/data  0 0
/data/journal            /var/log/journal    none  bind,x-systemd.requires-mounts-for=/data  0 0
tmpfs                    /tmp            tmpfs  rw,nosuid,nodev,size=64M,mode=1777      0 0
EOF
mkdir -p "$ROOT/data" "$ROOT/var/log/journal"
# what this slot is: read by flux-edge-update, the health gate and the Ansible update playbook
cat >"$ROOT/etc/flux-edge-image-release" <<EOF
VERSION=$VERSION
COMPATIBLE=$COMPATIBLE
SUITE=$SUITE
ARCH=$ARCH
BUILT=$(date -u +%FT%TZ)
EOF
# RAUC: two root filesystem slots; the boot loader is GRUB on the amd64 twin, the Pi firmware's
# tryboot (through flux-edge's custom backend) on the Pi
mkdir -p "$ROOT/etc/rauc"
cp "$KEYRING" "$ROOT/etc/rauc/keyring.pem"
if [ "$ARCH" = amd64 ]; then
    rauc_boot="bootloader=grub
grubenv=/boot/firmware/grub/grubenv"
    rauc_handlers=""
else
    rauc_boot="bootloader=custom"
    rauc_handlers="bootloader-custom-backend=/usr/local/lib/flux-edge-image/rauc-tryboot-backend"
fi
cat >"$ROOT/etc/rauc/system.conf" <<EOF
# flux-edge image ($ARCH): RAUC's view of the card. Written by image/build.sh.
[system]
compatible=$COMPATIBLE
$rauc_boot
# slot status (installed bundle versions, hashes) on the data partition: kept across updates
data-directory=/data/rauc
bundle-formats=-plain
# the slot marked bad before it is written; primary once written (RAUC's defaults, stated)
activate-installed=true

[keyring]
path=/etc/rauc/keyring.pem
use-bundle-signing-time=false

[handlers]
post-install=/usr/local/lib/flux-edge-image/rauc-post-install
$rauc_handlers

[slot.rootfs.0]
device=/dev/disk/by-partuuid/$DISK_ID-02
type=ext4
bootname=A
resize=true

[slot.rootfs.1]
device=/dev/disk/by-partuuid/$DISK_ID-03
type=ext4
bootname=B
resize=true
EOF
echo flux-edge >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	flux-edge
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# "admin": the only login, by SSH key only ("*": no password can ever match)
in_root useradd --create-home --shell /bin/bash --groups sudo,adm,systemd-journal,dialout admin
in_root usermod --password '*' admin
in_root systemctl enable --quiet systemd-networkd.service systemd-resolved.service \
    systemd-timesyncd.service flux-edge-growroot.service flux-edge-import.service \
    flux-edge-health-gate.service
# sshd starts only once the user asks for it (an ssh file or keys on the boot partition);
# wpa_supplicant only as wpa_supplicant@wlan0, set up the same way; no daily apt downloads
in_root systemctl disable --quiet ssh.service wpa_supplicant.service \
    apt-daily.timer apt-daily-upgrade.timer
# a headless appliance has nobody to answer systemd-firstboot's questions on its first boot
in_root systemctl mask --quiet systemd-firstboot.service
echo LANG=C.UTF-8 >"$ROOT/etc/default/locale"
if [ "$ARCH" = arm64 ]; then
    # the kernel command line and config.txt are written by raspi-firmware's kernel hook
    # (the A/B layout replaces its config.txt and cmdline.txt; these keep its hook quiet)
    sed -i -e 's|^#\?ROOTPART=.*|ROOTPART="PARTUUID='"$DISK_ID"'-02"|' \
           -e 's|^#\?CONSOLES=.*|CONSOLES="tty0 ttyS1,115200"|' \
           -e 's|^#\?CMA=.*|CMA=0|' "$ROOT/etc/default/raspi-firmware"
    grep -q "^ROOTPART=\"PARTUUID=$DISK_ID-02\"" "$ROOT/etc/default/raspi-firmware" \
        || die "could not set ROOTPART in /etc/default/raspi-firmware"
fi

# --- 3. flux-edge, by the Ansible role ----------------------------------------------------------
log "provision: ansible-playbook ansible/site.yml (chroot connection)"
t0=$SECONDS
# name resolution for the role's package tasks; the image's own resolv.conf comes back after
mv "$ROOT/etc/resolv.conf" "$WORK/resolv.conf.image" 2>/dev/null || true
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# packages the role installs must not start daemons inside the chroot
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
cat >"$WORK/inventory.yml" <<EOF
all:
  hosts:
    flux-edge-image:
      ansible_connection: community.general.chroot
      ansible_host: $ROOT
      ansible_python_interpreter: /usr/bin/python3
      # the chroot connection is root already: no sudo round trips through the emulator
      ansible_become: false
  children:
    flux_edge_gateways:
      hosts:
        flux-edge-image:
EOF
# the wheels go straight into the root filesystem: the role's copy would run one emulated
# module per wheel (about 4 minutes for an arm64 image)
install -d -m 0755 "$ROOT/opt/flux-edge/wheelhouse"
install -m 0644 "$WHEELHOUSE"/*.whl "$ROOT/opt/flux-edge/wheelhouse/"
cat >"$WORK/image-vars.yml" <<EOF
# set by image/build.sh for an image build
flux_edge_manage_service: false
flux_edge_wheelhouse: $WHEELHOUSE
flux_edge_wheelhouse_on_device: true
flux_edge_config_file: $CONFIG
EOF
# pipelining: one emulated process per task instead of several; profile_tasks: per-task times in
# ansible.log (under emulation each task costs seconds)
(cd "$REPO/ansible" && ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 ANSIBLE_PIPELINING=True \
    ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks "$ANSIBLE_PLAYBOOK" \
    -i "$WORK/inventory.yml" -e "@$WORK/image-vars.yml" --limit flux-edge-image site.yml) \
    >"$WORK/ansible.log" 2>&1 || { tail -n 60 "$WORK/ansible.log" >&2; die "ansible-playbook failed"; }
grep -E '^flux-edge-image +:' "$WORK/ansible.log" | sed 's/^/  /'
# what the unit needs is there, and the default configuration passes the daemon's own check
[ -x "$ROOT/opt/flux-edge/venv/bin/flux-edge" ] || die "the role left no /opt/flux-edge/venv"
in_root systemctl is-enabled --quiet flux-edge.service || die "flux-edge.service is not enabled"
in_root /opt/flux-edge/venv/bin/flux-edge check-config /etc/flux-edge/flux-edge.toml \
    | sed 's/^/  /' || die "the image's /etc/flux-edge/flux-edge.toml does not pass check-config"
rm -f "$ROOT/usr/sbin/policy-rc.d" "$ROOT/etc/resolv.conf"
if [ -e "$WORK/resolv.conf.image" ] || [ -L "$WORK/resolv.conf.image" ]; then
    mv "$WORK/resolv.conf.image" "$ROOT/etc/resolv.conf"
fi
# systemd-resolved's stub, whatever the chroot had
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
T_ANSIBLE=$((SECONDS - t0))
log "provision: done in ${T_ANSIBLE}s"
wait "$INITRAMFS_PID" || { tail -n 20 "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
log "initramfs: done (in parallel)"

# --- 4. boot files ------------------------------------------------------------------------------
[ -f "$ROOT/boot/initrd.img-$KVER" ] || die "no initrd in the image's /boot for $KVER"
mkdir -p "$ROOT/boot/firmware"
# What a slot boots with travels inside the slot (so a bundle brings its own kernel): the
# kernel, the initrd and (Pi) the device trees in /boot/slot-firmware; the boot partition gets
# a copy per slot (Pi: a/ and b/, made by the RAUC post-install handler on updates).
SLOTFW=$ROOT/boot/slot-firmware
mkdir -p "$SLOTFW"
cp "$ROOT/boot/vmlinuz-$KVER" "$SLOTFW/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$SLOTFW/initrd.img"
# the kernel command line of both slots but for root= and rauc.slot=, which the boot loader adds
if [ "$ARCH" = arm64 ]; then
    # ttyS1: the mini UART on GPIO 14/15 of a Pi 3/4 (enable_uart=1); ttyAMA10: the Pi 5's
    # debug UART connector. The last console= is /dev/console.
    echo "console=ttyAMA10,115200 console=ttyS1,115200 console=tty0 rw rootflags=noatime rootwait fsck.repair=yes net.ifnames=0 panic=10" \
        >"$SLOTFW/cmdline.common"
else
    echo "console=tty0 console=ttyS0,115200 rw rootflags=noatime rootwait fsck.repair=yes net.ifnames=0 panic=10" \
        >"$SLOTFW/cmdline.common"
fi
echo "$VERSION" >"$SLOTFW/VERSION"
if [ "$ARCH" = arm64 ]; then
    # raspi-firmware's kernel hook copies the firmware (bootcode.bin, start*.elf, fixup*.dat)
    # to /boot/firmware; its kernel, initrd, config.txt and cmdline.txt there are replaced by
    # the A/B layout below
    in_root env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware "$KVER" \
        || die "raspi-firmware's kernel hook failed"
    find "$ROOT/boot/firmware" -maxdepth 1 -type f \( -name 'vmlinuz*' -o -name 'initrd.img*' \
        -o -name '*.dtb' -o -name 'config.txt' -o -name 'cmdline.txt' \) -delete
    rm -rf "$ROOT/boot/firmware/overlays"
    # device trees: Pi 3/3+/CM3 and Zero 2 W (bcm2837), 4/400/CM4 (bcm2711), 5 (bcm2712)
    dtbdir=$ROOT/usr/lib/linux-image-$KVER/broadcom
    [ -d "$dtbdir" ] || die "no device trees in $dtbdir"
    n=0
    for dtb in "$dtbdir"/bcm2837-*.dtb "$dtbdir"/bcm2710-*.dtb "$dtbdir"/bcm2711-*.dtb \
               "$dtbdir"/bcm2712-*.dtb; do
        [ -f "$dtb" ] || continue
        cp "$dtb" "$SLOTFW/"; n=$((n + 1))
    done
    for need in bcm2837-rpi-3-b.dtb bcm2711-rpi-4-b.dtb bcm2712-rpi-5-b.dtb; do
        [ -f "$SLOTFW/$need" ] || die "$need is not in $KERNEL_PKG $KVER"
    done
    log "boot: $n device trees, Pi 5 (bcm2712-rpi-5-b.dtb) included"
    for fw in bootcode.bin start4.elf fixup4.dat start.elf fixup.dat; do
        [ -f "$ROOT/boot/firmware/$fw" ] || die "raspi-firmware left no $fw in /boot/firmware"
    done
    # on the device, kernel updates come in bundles: raspi-firmware's hooks must not rewrite
    # the boot partition behind RAUC's back
    for hook in /etc/kernel/postinst.d/z50-raspi-firmware /etc/initramfs/post-update.d/z50-raspi-firmware; do
        [ -e "$ROOT$hook" ] || continue
        in_root dpkg-divert --quiet --local --rename --divert "$hook.disabled-by-flux-edge" --add "$hook"
    done
    # slot A on the boot partition; config.txt boots it, tryboot.txt is made for a trial
    mkdir -p "$ROOT/boot/firmware/a"
    cp -a "$SLOTFW/." "$ROOT/boot/firmware/a/"
    echo "$(cat "$SLOTFW/cmdline.common") root=PARTUUID=$DISK_ID-02 rauc.slot=A" \
        >"$ROOT/boot/firmware/a/cmdline.txt"
    sed "s|@SLOT_DIR@|a/|" "$HERE/boot/config.txt" >"$ROOT/boot/firmware/config.txt"
    printf 'A\n' >"$ROOT/boot/firmware/flux-edge-slot.txt"
else
    # GRUB for BIOS: core.img (made here with the image's own grub-mkimage and modules) goes
    # between the MBR and the first partition, boot.img into the MBR; grub.cfg and the
    # environment RAUC edits (grubenv: ORDER, A_OK/A_TRY, B_OK/B_TRY) on the boot partition
    mkdir -p "$ROOT/boot/firmware/grub"
    cp "$HERE/boot/grub.cfg" "$ROOT/boot/firmware/grub/grub.cfg"
    sed -i "s|@DISK_ID@|$DISK_ID|g" "$ROOT/boot/firmware/grub/grub.cfg"
    in_root grub-editenv /boot/firmware/grub/grubenv create
    in_root grub-editenv /boot/firmware/grub/grubenv set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
    in_root grub-mkimage -O i386-pc -o /tmp/core.img -p '(hd0,msdos1)/grub' \
        biosdisk part_msdos fat ext2 normal linux loadenv test echo configfile serial terminal \
        || die "grub-mkimage failed"
    cp "$ROOT/tmp/core.img" "$WORK/grub-core.img"
    cp "$ROOT/usr/lib/grub/i386-pc/boot.img" "$WORK/grub-boot.img"
    # 4 MiB before the first partition, minus the MBR
    [ "$(stat -c %s "$WORK/grub-core.img")" -lt $((4 * 1024 * 1024 - 512)) ] || die "core.img too large"
fi
umount -R "$ROOT/tmp" "$ROOT/run" "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"
cp "$SLOTFW/vmlinuz" "$OUT/$NAME.vmlinuz"
cp "$SLOTFW/initrd.img" "$OUT/$NAME.initrd.img"

# --- 5. leave nothing per-build or per-device behind ---------------------------------------------
# every card makes its own SSH host keys (ssh.service drop-in) and machine id: an empty
# /etc/machine-id is filled at boot. (Not "uninitialized": that would make the first boot a
# systemd "first boot", which applies the distribution's presets and so re-enables the units
# disabled above, e.g. sshd, and takes long under emulation.)
rm -f "$ROOT"/etc/ssh/ssh_host_*
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb
rm -rf "$ROOT"/root/.ansible "$ROOT"/root/.cache "$ROOT"/tmp/* "$ROOT"/var/tmp/*
find "$ROOT/var/log" -type f \( -name '*.log' -o -name '*.gz' \) -delete
# shellcheck disable=SC2016  # dpkg-query's own ${...} fields
in_root dpkg-query -W -f='${Package} ${Version}\n' >"$OUT/$NAME.packages"

# --- 6. disk image -----------------------------------------------------------------------------
log "assemble: genimage (MBR: FAT RASPIFIRM, root A, root B, data FLUXDATA)"
t0=$SECONDS
mkdir -p "$FIRMWARE"
find "$ROOT/boot/firmware" -mindepth 1 -maxdepth 1 -exec mv -t "$FIRMWARE" {} +
# the data partition, seeded with what the slot has under the paths it takes over (the slot keeps
# its copies, hidden by the bind mounts: defaults for a data partition made anew)
DATA=$WORK/data
mkdir -p "$DATA/flux-edge" "$DATA/rauc" "$DATA/update"
cp -a "$ROOT/etc/flux-edge" "$DATA/flux-edge/etc"
cp -a "$ROOT/var/lib/flux-edge" "$DATA/flux-edge/state" 2>/dev/null \
    || install -d -m 0750 -o "$(stat -c %u "$ROOT/etc/flux-edge")" "$DATA/flux-edge/state"
cp -a "$ROOT/home" "$DATA/home"
install -d -m 2755 -g "$(chroot "$ROOT" getent group systemd-journal | cut -d: -f3)" "$DATA/journal"
chmod 0700 "$DATA/rauc"
chmod 0755 "$DATA/update"
# root: the content, 25% for growth, and room for the journal; the slot partitions are larger
# (--slot-size), so a later, larger release still fits; RAUC resizes the filesystem it writes
used_kib=$(du -s --block-size=1K --one-file-system "$ROOT" | cut -f1)
root_mib=$(( (used_kib * 5 / 4 / 1024 + 256 + 3) / 4 * 4 ))
[ "$root_mib" -le "$SLOT_MIB" ] || die "the root filesystem ($root_mib MiB) does not fit a slot (--slot-size $SLOT_MIB)"
cat >"$WORK/genimage.cfg" <<EOF
image firmware.vfat {
  vfat {
    label = "RASPIFIRM"
  }
  srcpath = "$FIRMWARE"
  size = 256M
  temporary = true
}
image rootfs.ext4 {
  ext4 {
    label = "flux-root"
    use-mke2fs = true
    root-owner = "0:0"
    extraargs = "-m 2"
  }
  srcpath = "$ROOT"
  size = ${root_mib}M
}
image data.ext4 {
  ext4 {
    label = "FLUXDATA"
    use-mke2fs = true
    root-owner = "0:0"
    extraargs = "-m 1"
  }
  srcpath = "$DATA"
  size = 256M
  temporary = true
}
image $NAME.img {
  hdimage {
    partition-table-type = "mbr"
    disk-signature = 0x$DISK_ID
  }
  partition firmware {
    partition-type = 0xC
    bootable = true
    image = "firmware.vfat"
    offset = 4M
  }
  partition rootfs-a {
    partition-type = 0x83
    image = "rootfs.ext4"
    size = ${SLOT_MIB}M
    align = 4M
  }
  partition rootfs-b {
    partition-type = 0x83
    size = ${SLOT_MIB}M
    align = 4M
  }
  partition data {
    partition-type = 0x83
    image = "data.ext4"
    align = 4M
  }
}
EOF
rm -f "$OUT/$NAME.img" "$OUT/$NAME.img.zst" "$OUT/$NAME.img.xz" "$OUT/$NAME.rootfs.ext4" "$OUT/$NAME.raucb"
mkdir -p "$WORK/genimage-tmp" "$WORK/genimage-in" "$WORK/genimage-root" "$WORK/genimage-out"
# every image names its srcpath: an empty --rootpath keeps genimage from copying the tree
genimage --config "$WORK/genimage.cfg" --rootpath "$WORK/genimage-root" --tmppath "$WORK/genimage-tmp" \
    --inputpath "$WORK/genimage-in" --outputpath "$WORK/genimage-out" >"$WORK/genimage.log" 2>&1 \
    || { tail -n 30 "$WORK/genimage.log" >&2; die "genimage failed"; }
mv "$WORK/genimage-out/$NAME.img" "$OUT/$NAME.img"
if [ "$ARCH" = amd64 ]; then
    # GRUB's boot code into the MBR (its first 440 bytes: the disk signature and the partition
    # table stay), core.img from sector 1 (where boot.img looks, and whose own block list
    # grub-mkimage wrote: the sectors that follow it)
    dd if="$WORK/grub-boot.img" of="$OUT/$NAME.img" bs=440 count=1 conv=notrunc status=none
    dd if="$WORK/grub-core.img" of="$OUT/$NAME.img" bs=512 seek=1 conv=notrunc status=none
fi
T_ASSEMBLE=$((SECONDS - t0))

T_BUNDLE=0
if [ "$BUNDLE" -eq 1 ]; then
    log "bundle: $NAME.raucb (RAUC, verity format, version $VERSION)"
    t0=$SECONDS
    mv "$WORK/genimage-out/rootfs.ext4" "$OUT/$NAME.rootfs.ext4"
    "$HERE/bundle.sh" --rootfs "$OUT/$NAME.rootfs.ext4" --compatible "$COMPATIBLE" \
        --version "$VERSION" --cert "$SIGNING_CERT" --key "$SIGNING_KEY" --keyring "$KEYRING" \
        --out "$OUT/$NAME.raucb" >"$WORK/bundle.log" 2>&1 \
        || { tail -n 30 "$WORK/bundle.log" >&2; die "making the bundle failed"; }
    T_BUNDLE=$((SECONDS - t0))
fi
[ "$DEV_KEYS" -eq 0 ] || echo "build.sh: note: the image trusts the DEVELOPMENT keys in image/keys/" \
    "(anyone with that directory can sign bundles it installs); use --keyring for a fleet" >&2

log "compress: zstd$([ "$XZ" -eq 0 ] || echo " and xz")"
t0=$SECONDS
zstd -q -T0 -10 "$OUT/$NAME.img" -o "$OUT/$NAME.img.zst"
[ "$XZ" -eq 0 ] || xz -T0 -6 -k "$OUT/$NAME.img"
T_COMPRESS=$((SECONDS - t0))
(cd "$OUT" && sha256sum "$NAME".img* >"$NAME.sha256")

size() { stat -c %s "$1"; }
mib() { echo "$(( ($1 + 524288) / 1048576 )) MiB"; }
{
    echo "image:        $OUT/$NAME.img"
    echo "arch:         $ARCH (kernel $KVER, initramfs MODULES=$INITRAMFS_MODE)"
    echo "raw:          $(size "$OUT/$NAME.img") bytes ($(mib "$(size "$OUT/$NAME.img")")), root fs ${root_mib} MiB, content $((used_kib / 1024)) MiB"
    echo "zstd:         $(size "$OUT/$NAME.img.zst") bytes ($(mib "$(size "$OUT/$NAME.img.zst")"))"
    [ "$XZ" -eq 0 ] || echo "xz:           $(size "$OUT/$NAME.img.xz") bytes ($(mib "$(size "$OUT/$NAME.img.xz")"))"
    echo "version:      $VERSION (compatible $COMPATIBLE), slots ${SLOT_MIB} MiB each"
    [ "$BUNDLE" -eq 0 ] || echo "bundle:       $(size "$OUT/$NAME.raucb") bytes ($(mib "$(size "$OUT/$NAME.raucb")"))"
    echo "time:         ${SECONDS}s total: rootfs (and wheelhouse) ${T_ROOTFS}s," \
         "ansible ${T_ANSIBLE}s, genimage ${T_ASSEMBLE}s, bundle ${T_BUNDLE}s, compress ${T_COMPRESS}s"
} | tee "$OUT/$NAME.build-info"
