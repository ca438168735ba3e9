#!/usr/bin/env bash
# Build the flux-edge appliance image: a Debian bookworm root filesystem (arm64 for the Raspberry
# Pi, or an amd64 twin for testing) provisioned by the project's Ansible role, assembled into a
# partitioned .img (FAT "RASPIFIRM" + ext4 "RASPIROOT", MBR) and compressed. See image/README.md.
#
#   image/build.sh [--arch arm64|amd64] [--out DIR] [--config FILE] [--test-initramfs]
#                  [--wheelhouse DIR] [--xz] [--mirror URL] [--keep-work]
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
SUITE=bookworm
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
        -h | --help) usage 0 ;;
        *) echo "build.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done

die() { echo "build.sh: error: $*" >&2; exit 1; }
log() { printf '[%4ds] %s\n' $((SECONDS)) "$*"; }

case $ARCH in
    arm64) KERNEL_PKG=linux-image-arm64; QEMU_BINFMT=qemu-aarch64 ;;
    amd64) KERNEL_PKG=linux-image-amd64; QEMU_BINFMT="" ;;
    *) die "--arch must be arm64 or amd64, not '$ARCH'" ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root, chroot, mounts)"
[ "$(uname -m)" = x86_64 ] || die "the builder runs on an x86_64 host, this is $(uname -m)"
CONFIG=$(readlink -f "$CONFIG")
[ -f "$CONFIG" ] || die "--config $CONFIG: no such file"
[ -z "$WHEELHOUSE" ] || WHEELHOUSE=$(readlink -f "$WHEELHOUSE")
mkdir -p "$OUT"
OUT=$(readlink -f "$OUT")

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
for tool in mmdebstrap genimage mke2fs mkfs.vfat mcopy zstd chroot findmnt; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -n "$ANSIBLE_PLAYBOOK" ] || missing+=(ansible-playbook)
[ "$XZ" -eq 0 ] || command -v xz >/dev/null || missing+=(xz)
if [ -n "$QEMU_BINFMT" ]; then
    command -v update-binfmts >/dev/null || missing+=(update-binfmts)
    [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || [ -e /usr/bin/qemu-aarch64-static ] \
        || missing+=(qemu-aarch64-static)
fi
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (Debian: apt-get install mmdebstrap" \
    "genimage e2fsprogs dosfstools mtools zstd qemu-user-static binfmt-support; ansible from pip)"

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
          systemd-timesyncd systemd-resolved sudo iproute2 netbase tzdata)
[ "$ARCH" = arm64 ] && PACKAGES+=(raspi-firmware firmware-brcm80211)
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
    log "wheelhouse: tools/build-wheelhouse.sh $wh_arch (in the background)"
    "$REPO/tools/build-wheelhouse.sh" "$wh_arch" "$WHEELHOUSE" >"$WORK/wheelhouse.log" 2>&1 &
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
cat >"$ROOT/etc/fstab" <<'EOF'
# flux-edge image. noatime: reading a file does not write to the SD card.
LABEL=RASPIROOT  /               ext4   rw,noatime,errors=remount-ro            0 1
LABEL=RASPIFIRM  /boot/firmware  vfat   rw,noatime,umask=0077,shortname=mixed   0 2
tmpfs            /tmp            tmpfs  rw,nosuid,nodev,size=64M,mode=1777      0 0
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
    systemd-timesyncd.service flux-edge-growroot.service flux-edge-import.service
# sshd starts only once the user asks for it (an ssh file or keys on the boot partition);
# wpa_supplicant only as wpa_supplicant@wlan0, set up the same way; no daily apt downloads
in_root systemctl disable --quiet ssh.service wpa_supplicant.service \
    apt-daily.timer apt-daily-upgrade.timer
# a headless appliance has nobody to answer systemd-firstboot's questions on its first boot
in_root systemctl mask --quiet systemd-firstboot.service
echo LANG=C.UTF-8 >"$ROOT/etc/default/locale"
if [ "$ARCH" = arm64 ]; then
    # the kernel command line and config.txt are written by raspi-firmware's kernel hook
    sed -i -e 's|^#\?ROOTPART=.*|ROOTPART="LABEL=RASPIROOT"|' \
           -e 's|^#\?CONSOLES=.*|CONSOLES="tty0 ttyS1,115200"|' \
           -e 's|^#\?CMA=.*|CMA=0|' "$ROOT/etc/default/raspi-firmware"
    grep -q '^ROOTPART="LABEL=RASPIROOT"' "$ROOT/etc/default/raspi-firmware" \
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
cat >"$WORK/image-vars.yml" <<EOF
# set by image/build.sh for an image build
flux_edge_manage_service: false
flux_edge_wheelhouse: $WHEELHOUSE
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
if [ "$ARCH" = arm64 ]; then
    # re-run raspi-firmware's kernel hook with the settings above: kernel, initrd, DTBs,
    # config.txt and cmdline.txt in /boot/firmware
    in_root env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware "$KVER" \
        || die "raspi-firmware's kernel hook failed"
    grep -q 'root=LABEL=RASPIROOT' "$ROOT/boot/firmware/cmdline.txt" \
        || die "cmdline.txt does not boot from LABEL=RASPIROOT: $(cat "$ROOT/boot/firmware/cmdline.txt")"
else
    # the amd64 twin boots its kernel directly (qemu -kernel/-initrd): a copy on the FAT
    cp "$ROOT/boot/vmlinuz-$KVER" "$ROOT/boot/firmware/vmlinuz-$KVER"
    cp "$ROOT/boot/initrd.img-$KVER" "$ROOT/boot/firmware/initrd.img-$KVER"
    echo "root=LABEL=RASPIROOT rw fsck.repair=yes net.ifnames=0 console=ttyS0,115200" \
        >"$ROOT/boot/firmware/cmdline.txt"
fi
umount -R "$ROOT/tmp" "$ROOT/run" "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/$NAME.vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$OUT/$NAME.initrd.img"

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
log "assemble: genimage (FAT RASPIFIRM + ext4 RASPIROOT, MBR)"
t0=$SECONDS
mkdir -p "$FIRMWARE"
find "$ROOT/boot/firmware" -mindepth 1 -maxdepth 1 -exec mv -t "$FIRMWARE" {} +
# root: the content, 25% for growth until the first boot grows it, and room for the journal
used_kib=$(du -s --block-size=1K "$ROOT" | cut -f1)
root_mib=$(( (used_kib * 5 / 4 / 1024 + 256 + 3) / 4 * 4 ))
cat >"$WORK/genimage.cfg" <<EOF
image firmware.vfat {
  vfat {
    label = "RASPIFIRM"
  }
  srcpath = "$FIRMWARE"
  size = 256M
  temporary = true
}
image root.ext4 {
  ext4 {
    label = "RASPIROOT"
    use-mke2fs = true
    root-owner = "0:0"
    extraargs = "-m 2"
  }
  srcpath = "$ROOT"
  size = ${root_mib}M
  temporary = true
}
image $NAME.img {
  hdimage {
    partition-table-type = "mbr"
  }
  partition firmware {
    partition-type = 0xC
    bootable = true
    image = "firmware.vfat"
    offset = 4M
  }
  partition root {
    partition-type = 0x83
    image = "root.ext4"
    align = 4M
  }
}
EOF
rm -f "$OUT/$NAME.img" "$OUT/$NAME.img.zst" "$OUT/$NAME.img.xz"
mkdir -p "$WORK/genimage-tmp" "$WORK/genimage-in" "$WORK/genimage-root"
# every image names its srcpath: an empty --rootpath keeps genimage from copying the tree
genimage --config "$WORK/genimage.cfg" --rootpath "$WORK/genimage-root" --tmppath "$WORK/genimage-tmp" \
    --inputpath "$WORK/genimage-in" --outputpath "$OUT" >"$WORK/genimage.log" 2>&1 \
    || { tail -n 30 "$WORK/genimage.log" >&2; die "genimage failed"; }
T_ASSEMBLE=$((SECONDS - t0))

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
    echo "time:         ${SECONDS}s total: rootfs (and wheelhouse) ${T_ROOTFS}s," \
         "ansible ${T_ANSIBLE}s, genimage ${T_ASSEMBLE}s, compress ${T_COMPRESS}s"
} | tee "$OUT/$NAME.build-info"
